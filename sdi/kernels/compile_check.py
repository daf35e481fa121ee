"""Compile the Triton kernels for NVIDIA targets without a GPU and read what the compiler shows.

Used by ``bench/gpu/kernel_report.py`` (``make kernel-report``) and
``tests/test_kernel_compile.py``.
:func:`launch_specs` lists every kernel at every launch configuration its launcher can pick for the
given sketch sizes and row counts -- taken from the same ``*_config`` functions the launchers call,
so the two cannot drift apart. :func:`compile_stats` compiles one spec with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and runs the ``ptxas`` that
Triton itself uses with ``-v`` on the PTX: registers per thread, spill bytes, stack frame; the
shared memory comes from Triton's metadata. :func:`occupancy` turns them into resident CTAs per SM.

Needs only the Triton wheel (its ``ptxas``); works with Triton 3.0 (whose ``ASTSource`` keys the
signature by argument index) and later (keyed by name, constexprs in the signature).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
import triton.language as tl

from .count_sketch import _count_sketch_kernel, count_sketch_config
from .embedding import _embedding_kernel, embedding_config
from .linear_fused import (
    FUSED_MAX_M,
    FUSED_MIN_M,
    _fused_linear_kernel,
    fused_config,
    fused_factors,
    fused_unsupported,
)
from .linear_simple import _spectrum_dot_kernel, spectrum_dot_config
from .utils import GATHER_UNROLL

# NVIDIA target name -> compute capability.
TARGETS = {"sm_90a": 90, "sm_100a": 100}

_TRITON_TYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class LaunchSpec:
    """One kernel at one launch configuration: what ``triton.compile`` needs."""

    kernel: str
    config: str  # human-readable, e.g. "BLOCK_T=2, 4 warps"
    fn: object = field(repr=False, compare=False)
    args: tuple[tuple[str, str], ...]  # (name, Triton type) of the runtime arguments, in order
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int = 3  # Triton's default on NVIDIA
    m: int | None = None  # the sketch size of a fused spec (its launcher may refuse some targets)

    @property
    def key(self) -> tuple:
        return (self.kernel, self.args, self.constexprs, self.num_warps, self.num_stages)


@dataclass(frozen=True)
class CompileStats:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame
    shared: int  # bytes of shared memory per CTA (Triton's metadata)
    traps: int = 0  # `trap;` instructions in the PTX: LLVM found undefined behaviour and gave up

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def launch_specs(
    m_values, row_counts=(), dtype: str = "bf16", *, fused: bool = True
) -> list[LaunchSpec]:
    """Every kernel at every configuration its launcher picks for sketch sizes ``m_values`` and
    the ``row_counts`` (tokens B*T) given, inputs of ``dtype``; duplicates removed, in order."""
    x = _TRITON_TYPE[dtype]
    rows = tuple(row_counts) or (4096,)
    specs: list[LaunchSpec] = []
    for m in m_values:
        for n in rows:
            cs = count_sketch_config(n, m)
            specs.append(
                LaunchSpec(
                    "count_sketch",
                    f"BLOCK_N={cs.BLOCK_N}, BLOCK_M={cs.BLOCK_M}, {cs.num_warps} warps",
                    _count_sketch_kernel,
                    (
                        ("x_ptr", x),
                        ("codes_ptr", "*i32"),
                        ("out_ptr", "*fp32"),
                        ("N", "i32"),
                        ("m", "i32"),
                        ("L", "i32"),
                        ("stride_x", "i32"),
                        ("stride_out", "i32"),
                    ),
                    (("BLOCK_N", cs.BLOCK_N), ("BLOCK_M", cs.BLOCK_M), ("UNROLL", GATHER_UNROLL)),
                    cs.num_warps,
                )
            )
        sd = spectrum_dot_config(m // 2 + 1)
        specs.append(
            LaunchSpec(
                "spectrum_dot",
                f"BLOCK_F={sd.BLOCK_F}, {sd.num_warps} warps",
                _spectrum_dot_kernel,
                (
                    ("a_ptr", "*fp32"),
                    ("g_ptr", "*fp32"),
                    ("part_ptr", "*fp32"),
                    ("B", "i32"),
                    ("T", "i32"),
                    ("F", "i32"),
                    ("tokens_per_chunk", "i32"),
                ),
                (("BLOCK_F", sd.BLOCK_F),),
                sd.num_warps,
            )
        )
        em = embedding_config(m)
        specs.append(
            LaunchSpec(
                "embedding",
                f"BLOCK_M={em.BLOCK_M}, {em.num_warps} warps",
                _embedding_kernel,
                (
                    ("ids_ptr", "*i64"),
                    ("g_ptr", x),
                    ("codes_ptr", "*i32"),
                    ("h_out_ptr", "*i32"),
                    ("s_out_ptr", "*fp32"),
                    ("part_ptr", "*fp32"),
                    *((n, "i32") for n in ("B", "T", "d", "m", "V", "width", "tokens_per_chunk")),
                ),
                (("BLOCK_M", em.BLOCK_M), ("UNROLL", GATHER_UNROLL)),
                em.num_warps,
            )
        )
        if fused and FUSED_MIN_M <= m <= FUSED_MAX_M and not m & (m - 1):
            fc = fused_config(m)
            m1, m2 = fused_factors(m)
            factors = "*bf16" if m2 >= 16 else "*fp32"  # as linear_fused passes them
            specs.append(
                LaunchSpec(
                    "linear_fused",
                    f"m={m} ({m1}x{m2}), BLOCK_T={fc.BLOCK_T}, BLOCK_K={fc.BLOCK_K}, "
                    f"UNROLL={fc.UNROLL}, {fc.num_warps} warps",
                    _fused_linear_kernel,
                    (
                        ("a_ptr", x),
                        ("g_ptr", x),
                        ("codes_a_ptr", "*i32"),
                        ("codes_g_ptr", "*i32"),
                        ("width_a", "i32"),
                        ("width_g", "i32"),
                        ("f1_ptr", factors),
                        ("f2_ptr", factors),
                        ("tw_ptr", "*fp32"),
                        ("part_ptr", "*fp32"),
                        *((n, "i32") for n in ("T", "d_in", "d_out", "n_chunks")),
                        ("tokens_per_chunk", "i32"),
                    ),
                    (
                        ("M1", m1),
                        ("M2", m2),
                        ("BLOCK_T", fc.BLOCK_T),
                        ("BLOCK_K", fc.BLOCK_K),
                        ("USE_DOT", m2 >= 16),
                        ("DOT_DTYPE", tl.bfloat16 if m2 >= 16 else tl.float32),
                        ("UNROLL", fc.UNROLL),
                    ),
                    fc.num_warps,
                    m=m,
                )
            )
    unique: dict[tuple, LaunchSpec] = {}
    for spec in specs:
        unique.setdefault(spec.key, spec)
    return list(unique.values())


def not_launched(spec: LaunchSpec, target: str) -> str | None:
    """Why the launcher never runs ``spec`` on ``target`` with this Triton (None: it does)."""
    if spec.kernel != "linear_fused":
        return None
    return fused_unsupported(spec.m, (TARGETS[target] // 10, TARGETS[target] % 10))


def _triton_version() -> tuple[int, int]:
    major, minor = (int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    return major, minor


def _source(spec: LaunchSpec):
    from triton.compiler import ASTSource

    names = [name for name, _ in spec.args]
    if _triton_version() >= (3, 2):
        signature = dict(spec.args)
        signature.update({name: "constexpr" for name, _ in spec.constexprs})
        return ASTSource(spec.fn, signature, dict(spec.constexprs))
    # Triton 3.0/3.1: keyed by the index among all the kernel's parameters.
    order = spec.fn.arg_names
    signature = {order.index(name): ty for name, ty in spec.args}
    constants = {order.index(name): value for name, value in spec.constexprs}
    assert len(signature) + len(constants) == len(order), names
    return ASTSource(spec.fn, signature, constants)


@functools.cache
def ptxas_path(cc: int) -> str | None:
    """The ``ptxas`` Triton uses for capability ``cc``, or None if the wheel has none."""
    from triton.backends.nvidia import compiler as nv

    try:
        # Triton 3.0-3.2: one ptxas; 3.3 and >= 3.5: one per target family; 3.4: one again.
        # Older versions return (path, version), newer ones a tool object with .path.
        if not hasattr(nv, "get_ptxas"):
            tool = nv._path_to_binary("ptxas")
        elif inspect.signature(nv.get_ptxas).parameters:
            tool = nv.get_ptxas(cc)
        else:
            tool = nv.get_ptxas()
        path = tool[0] if isinstance(tool, tuple) else tool.path
    except Exception:  # noqa: BLE001 -- any failure to locate it means "not available"
        return None
    return path if path and os.path.exists(path) else None


@functools.cache
def ptxas_supports(cc: int) -> tuple[bool, str]:
    """Whether the wheel's ptxas can assemble for ``sm_<cc>a``, and why not."""
    path = ptxas_path(cc)
    if path is None:
        return False, "this Triton wheel ships no ptxas"
    out = subprocess.run([path, "--help"], capture_output=True, text=True).stdout
    if f"sm_{cc}a" not in out and f"sm_{cc}" not in out:
        version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release ([\d.]+)", version)
        return False, (
            f"the ptxas of Triton {triton.__version__} (CUDA "
            f"{release.group(1) if release else '?'}) cannot target sm_{cc}a"
        )
    return True, path


_PTXAS_LINE = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


@functools.cache
def compile_stats(spec: LaunchSpec, target: str) -> CompileStats:
    """Compile ``spec`` for ``target`` (``"sm_90a"`` / ``"sm_100a"``) and read ``ptxas -v``."""
    from triton.backends.compiler import GPUTarget

    cc = TARGETS[target]
    ok, why = ptxas_supports(cc)
    if not ok:
        raise RuntimeError(why)
    compiled = triton.compile(
        _source(spec),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run(
            [why, "-v", f"--gpu-name={target}", ptx, "-o", ptx + ".cubin"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    found = {k: [int(v) for v in pat.findall(log)] for k, pat in _PTXAS_LINE.items()}
    traps = len(re.findall(r"^\s*trap;", compiled.asm["ptx"], flags=re.MULTILINE))
    if not found["registers"]:
        raise RuntimeError(f"no register count in the ptxas log of {spec.kernel}:\n{log}")
    return CompileStats(
        registers=max(found["registers"]),
        spill_stores=sum(found["spill_stores"]),
        spill_loads=sum(found["spill_loads"]),
        stack=max(found["stack"], default=0),
        shared=int(compiled.metadata.shared),
        traps=traps,
    )


# Per-SM limits of H100 / H200 (sm_90) and B200 (sm_100), NVIDIA CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability" (9.0 and 10.0 have the same values):
SM_LIMITS = {
    "registers": 65536,  # 32-bit registers per SM
    "max_registers_per_thread": 255,
    "register_alloc_unit": 256,  # registers per warp are allocated in units of 256
    "shared_per_sm": 228 * 1024,
    "shared_per_block": 227 * 1024,
    "shared_reserved_per_block": 1024,  # the system's 1 KB per resident CTA
    "threads": 2048,
    "ctas": 32,
}


def occupancy(stats: CompileStats, num_warps: int) -> tuple[int, str]:
    """Resident CTAs per SM that the registers, shared memory, threads and CTA limits allow, and
    which limit binds."""
    lim = SM_LIMITS
    unit = lim["register_alloc_unit"]
    regs_per_warp = -(-max(stats.registers, 1) * 32 // unit) * unit
    by = {
        "registers": lim["registers"] // (regs_per_warp * num_warps),
        "threads": lim["threads"] // (32 * num_warps),
        "CTA slots": lim["ctas"],
    }
    if stats.shared > lim["shared_per_block"]:
        by["shared"] = 0
    elif stats.shared:
        by["shared"] = lim["shared_per_sm"] // (stats.shared + lim["shared_reserved_per_block"])
    limit = min(by, key=by.get)
    return by[limit], limit


# --------------------------------------------------------------------------------------------
# compiling in a child process: a clean environment (kernels defined under TRITON_INTERPRET=1 are
# interpreter functions, not compilable), and a compiler that aborts cannot take the caller down.


def stats_in_subprocess(
    m_values, row_counts, targets, timeout: float = 1800
) -> dict[tuple[int, str], dict]:
    """Compile ``launch_specs(m_values, row_counts)`` for ``targets`` in one child process.

    Returns ``{(spec index, target): record}``; a record holds ``"stats"`` (a
    :class:`CompileStats` as a dict), ``"refused"`` (:func:`not_launched`), ``"unsupported"``
    (:func:`ptxas_supports`) or ``"error"`` -- also for every spec left when the child died.
    """
    import json
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    request = json.dumps({"m": list(m_values), "rows": list(row_counts), "targets": list(targets)})
    proc = subprocess.run(
        [sys.executable, "-m", "sdi.kernels.compile_check", request],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    records = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            records[(rec["index"], rec["target"])] = rec
    n_specs = len(launch_specs(m_values, row_counts))
    died = f"the compiler process exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    for index in range(n_specs):
        for target in targets:
            records.setdefault((index, target), {"error": died})
    return records


def _child(request: str) -> None:
    import dataclasses
    import json
    import sys

    args = json.loads(request)
    for index, spec in enumerate(launch_specs(args["m"], args["rows"])):
        for target in args["targets"]:
            rec: dict = {"index": index, "target": target}
            print(
                f"compiling {spec.kernel} [{spec.config}] for {target}", file=sys.stderr, flush=True
            )
            try:
                ok, why = ptxas_supports(TARGETS[target])
                refused = not_launched(spec, target)
                if refused:
                    rec["refused"] = refused
                elif not ok:
                    rec["unsupported"] = why
                else:
                    rec["stats"] = dataclasses.asdict(compile_stats(spec, target))
            except Exception as err:  # noqa: BLE001 -- reported to the parent
                rec["error"] = f"{type(err).__name__}: {err}"
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    import sys

    _child(sys.argv[1])
