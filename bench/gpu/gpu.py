"""GPU check and benchmark of the sketch kernels: ``bash bench/gpu/gpu.sh [--out FILE]``.

1. Correctness on the device: the kernel test suite itself, ``pytest tests/test_triton_kernels.py``
   with ``TRITON_INTERPRET=0`` (odd shapes, masks, poisoned outputs, every path), then every timed
   case against the torch backend (max |diff| / max |ref|). A failing test or an error above
   ``TOL`` is printed as FAIL and makes the script exit 1 (after finishing the rest).
2. Timings, median of ``triton.testing.do_bench``: torch backend (FFT path, and the CPU's
   materialised-gradient path run on the GPU) vs Triton TensorSketch path ``"simple"`` (a) vs
   ``"fused"`` (b); the Embedding kernel; and end to end,
   ``ProjectedTracInSDI.featurize_loader`` with ``SDI_BACKEND=torch`` and ``=triton`` on a looped
   GPT-style model (~135M parameters, tau=32) against a plain forward+backward of the same batch.
   Beside each Linear time: the compile-time roofline's prediction for an H200
   (:mod:`sdi.kernels.roofline`), and at the end the default path the measurements would pick
   (the rule in :func:`sdi.kernels.linear.default_path` follows the prediction until then).
3. Markdown tables, printed and written to ``--out`` (rewritten after every case, so a run cut
   short still leaves what it measured). The floor of a case is the time to read its activations
   and grad-outputs once at the copy bandwidth measured on ``torch.empty_like(x).copy_(x)``.

Sized to finish in a few minutes on an H200 with no network (most of it is Triton compiling).
``--smoke`` runs the same script with tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (the
kernel tests too, in the interpreter).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # cases.py, the table shared with the CPU suite

import cases  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

try:
    from sdi import ProjectedTracInSDI  # noqa: E402
    from sdi.kernels import (
        roofline,  # noqa: E402
        torch_ops,  # noqa: E402
    )
    from sdi.kernels.embedding import tensor_sketch_embedding  # noqa: E402
    from sdi.kernels.linear import default_path, tensor_sketch_linear  # noqa: E402
    from sdi.sketch import draw_tensor_sketch  # noqa: E402
    from sdi.toy import LoopedTransformer, next_token_loss  # noqa: E402
except ImportError as err:
    sys.exit(
        f"cannot import sdi ({err}); on a machine without its dependencies see bench/gpu/gpu.sh"
    )

TOL = 1e-3
E2E_TOL = 2e-2
DEVICE = torch.device("cpu" if SMOKE else "cuda")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

# The timed cases come from the table shared with the CPU suite (bench/cases.py).
if SMOKE:
    LINEAR_CASES = cases.SMOKE_LINEAR
    EMBEDDING_CASE = cases.SMOKE_EMBEDDING
    MODEL_CASE = cases.SMOKE_MODEL
    COPY_BYTES = 16 * 2**20
else:
    LINEAR_CASES = cases.on(cases.LINEAR, "cuda")
    EMBEDDING_CASE = cases.on(cases.EMBEDDING, "cuda")[0]
    MODEL_CASE = cases.MODEL
    COPY_BYTES = 2**30


def elapsed() -> str:
    return f"[{time.perf_counter() - START:6.1f}s]"


def log(msg: str) -> None:
    print(f"{elapsed()} {msg}", flush=True)


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()``: do_bench on the GPU, a few wall-clock runs in the smoke."""
    if not SMOKE:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


class Report:
    """Collects check results, timing rows and errors; renders and writes the markdown."""

    def __init__(self, out: Path, header: list[str]):
        self.out, self.header = out, header
        self.checks: list[tuple[str, float, float]] = []
        self.rows: list[list[str]] = []
        self.e2e: list[list[str]] = []
        self.errors: list[str] = []
        self.tests = "not run"
        self.winners: list[tuple[str, str]] = []  # (case, fastest measured Linear path)

    def check(self, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
        err = rel_err(got, ref)  # NaN if got holds a NaN
        self.checks.append((name, err, tol))
        log(f"check {name}: max rel err {err:.2e} {'ok' if err <= tol else 'FAIL'}")

    @property
    def failed(self) -> list[str]:
        return [n for n, e, tol in self.checks if not e <= tol]

    def error(self, name: str) -> None:
        msg = f"{name}: {traceback.format_exc().strip().splitlines()[-1]}"
        self.errors.append(msg)
        log(f"ERROR {msg}")
        traceback.print_exc()

    def render(self) -> str:
        lines = [*self.header, ""]
        lines += ["## Timings (median ms)", ""]
        lines += [
            "| case | torch | torch explicit | explicit speedup | triton-a (simple)"
            " | triton-b (fused) | a speedup | b speedup | read-once floor | best / floor"
            " | predicted a / b (H200 roofline) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *("| " + " | ".join(r) + " |" for r in self.rows),
            "",
        ]
        if self.e2e:
            lines += [
                "## End to end: featurize_loader vs plain forward+backward (median ms)",
                "",
                "| case | fwd+bwd | featurize torch | featurize triton | torch / fwd+bwd "
                "| triton / fwd+bwd | triton speedup |",
                "|---|---:|---:|---:|---:|---:|---:|",
                *("| " + " | ".join(r) + " |" for r in self.e2e),
                "",
            ]
        if self.winners:
            fastest = {w for _, w in self.winners}
            verdict = (
                fastest.pop()
                if len(fastest) == 1
                else "mixed: " + ", ".join(f"{c}: {w}" for c, w in self.winners)
            )
            lines += [
                "## Default Linear path",
                "",
                "- predicted (compile-time roofline, `sdi.kernels.linear.default_path`): "
                + ", ".join(
                    f"m={m}: {default_path(m, DEVICE)}"
                    for m in sorted({c[-1] for c in LINEAR_CASES})
                ),
                f"- measured here, fastest per case: {verdict}; this run would make "
                f"`{verdict if not verdict.startswith('mixed') else 'a per-m rule'}` the default",
                "",
            ]
        lines += ["## Kernel tests on this device", "", f"- {self.tests}", ""]
        lines += ["## Correctness vs torch backend (max |diff| / max |ref|)", ""]
        lines += ["| check | max rel err | tolerance | ok |", "|---|---:|---:|---|"]
        lines += [
            f"| {n} | {e:.2e} | {tol:g} | {'yes' if e <= tol else '**FAIL**'} |"
            for n, e, tol in self.checks
        ]
        if self.errors:
            lines += ["", "## Errors", "", *(f"- `{e}`" for e in self.errors)]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(self.render())


def fmt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.3f}"


def ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.2f}×"


def copy_bandwidth() -> float:
    """Bytes per second of a device copy, counting the bytes read and the bytes written."""
    x = torch.empty(COPY_BYTES // 4, dtype=F32, device=DEVICE).fill_(1.0)
    ms = bench_ms(lambda: torch.empty_like(x).copy_(x))
    return 2 * COPY_BYTES / (ms * 1e-3)


def randn(gen: torch.Generator, *shape, dtype=BF16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def kernel_tests(rep: Report) -> None:
    """Run tests/test_triton_kernels.py on this device (in the interpreter for --smoke)."""
    env = dict(os.environ, TRITON_INTERPRET="1" if SMOKE else "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_triton_kernels.py",
    ]
    log(f"kernel tests: {' '.join(cmd[2:])} (TRITON_INTERPRET={env['TRITON_INTERPRET']})")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    summary = tail[-1] if tail else "no output"
    rep.tests = f"`{' '.join(cmd[2:])}` (TRITON_INTERPRET={env['TRITON_INTERPRET']}): {summary}"
    if proc.returncode != 0:
        rep.errors.append(f"kernel tests failed (exit {proc.returncode}): {summary}")


def linear_case(rep: Report, gen: torch.Generator, bw: float, case) -> None:
    n_b, n_t, d_in, d_out, m = case
    name = f"linear B={n_b} T={n_t} d_in={d_in} d_out={d_out} m={m} bf16"
    table = draw_tensor_sketch(d_out, d_in, m, gen).to(DEVICE)
    a = randn(gen, n_b, n_t, d_in)
    g = randn(gen, n_b, n_t, d_out) * 1e-3
    floor = (a.numel() * a.element_size() + g.numel() * g.element_size()) / bw * 1e3
    ref = torch_ops.tensor_sketch_linear(a, g, table)
    times: dict[str, float | None] = {
        "torch": None,
        "explicit": None,
        "simple": None,
        "fused": None,
    }
    for path in ("simple", "fused"):
        try:
            rep.check(f"{name} [{path}]", tensor_sketch_linear(a, g, table, path=path), ref)
            times[path] = bench_ms(lambda p=path: tensor_sketch_linear(a, g, table, path=p))
        except Exception:
            rep.error(f"{name} [{path}]")
    # The CPU's materialised-gradient path (batched matmul + cached 2-D hash) run on the GPU: the
    # cost model takes it on the CPU only; this column says whether the GPU should too.
    try:
        index = torch_ops.signed_index(table)

        def explicit():
            return torch_ops.sketch_dense(torch_ops.linear_weight_grads(a, g), index, m)

        rep.check(f"{name} [torch explicit]", explicit(), ref)
        times["explicit"] = bench_ms(explicit)
    except Exception:
        rep.error(f"{name} [torch explicit]")
    del ref
    times["torch"] = bench_ms(lambda: torch_ops.tensor_sketch_linear(a, g, table))
    done = {p: times[p] for p in ("simple", "fused") if times[p] is not None}
    best = min(done.values()) if done else None
    if done:
        rep.winners.append((name, min(done, key=done.get)))
    predicted = [roofline.linear_estimate(p, *case) for p in ("simple", "fused")]
    rep.rows.append(
        [
            name,
            fmt(times["torch"]),
            fmt(times["explicit"]),
            ratio(times["torch"], times["explicit"]),
            fmt(times["simple"]),
            fmt(times["fused"]),
            ratio(times["torch"], times["simple"]),
            ratio(times["torch"], times["fused"]),
            fmt(floor),
            ratio(best, floor),
            " / ".join("—" if e is None else f"{e.ms:.3g}" for e in predicted),
        ]
    )


def embedding_case(rep: Report, gen: torch.Generator, bw: float) -> None:
    n_b, n_t, vocab, d, m = EMBEDDING_CASE
    name = f"embedding B={n_b} T={n_t} V={vocab} d={d} m={m} bf16"
    table = draw_tensor_sketch(vocab, d, m, gen).to(DEVICE)
    ids = torch.randint(0, vocab, (n_b, n_t), generator=gen).to(DEVICE)
    g = randn(gen, n_b, n_t, d)
    floor = (g.numel() * g.element_size() + ids.numel() * ids.element_size()) / bw * 1e3
    rep.check(
        name,
        tensor_sketch_embedding(ids, g, table),
        torch_ops.tensor_sketch_embedding(ids, g, table),
    )
    t_torch = bench_ms(lambda: torch_ops.tensor_sketch_embedding(ids, g, table))
    t_triton = bench_ms(lambda: tensor_sketch_embedding(ids, g, table))
    rep.rows.append(
        [
            name,
            fmt(t_torch),
            "—",  # no materialised-gradient path: the shift-add is already exact and cheap
            "—",
            fmt(t_triton),
            "—",
            ratio(t_torch, t_triton),
            "—",
            fmt(floor),
            ratio(t_triton, floor),
            "—",
        ]
    )


def end_to_end_case(rep: Report) -> None:
    vocab, d_model, heads, tau, seq, batch_size, m = MODEL_CASE
    torch.manual_seed(0)
    model = LoopedTransformer(
        vocab=vocab, d_model=d_model, n_heads=heads, loop_steps=tau, max_len=seq
    )
    model = model.to(device=DEVICE, dtype=BF16)
    n_params = sum(p.numel() for p in model.parameters())
    name = (
        f"looped GPT {n_params / 1e6:.1f}M params, tau={tau}, seq={seq}, "
        f"batch={batch_size}, m={m}, bf16"
    )
    batch = {"tokens": torch.randint(0, vocab, (batch_size, seq), device=DEVICE)}

    def forward_backward():
        model.zero_grad(set_to_none=True)
        next_token_loss(model, batch).sum().backward()

    t_plain = bench_ms(forward_backward)
    model.zero_grad(set_to_none=True)
    log(f"e2e plain forward+backward: {t_plain:.3f} ms")
    feats, times = {}, {}
    for backend in ("torch", "triton"):
        os.environ["SDI_BACKEND"] = backend
        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=m, seed=0, loss_reduction="sum"
        )
        try:
            feats[backend] = est.featurize_loader(loader=[batch], loss_fn=next_token_loss)
            times[backend] = bench_ms(
                lambda e=est: e.featurize_loader(loader=[batch], loss_fn=next_token_loss)
            )
            log(f"e2e featurize_loader SDI_BACKEND={backend}: {times[backend]:.3f} ms")
        finally:
            est.close()
    os.environ.pop("SDI_BACKEND")
    # Looser: the two featurisations run separate backward passes, which may differ in bf16
    # rounding (e.g. atomics in attention backward), and the difference grows through tau steps.
    for param, ref in feats["torch"].phi.items():
        rep.check(f"e2e features {param}", feats["triton"].phi[param], ref, tol=E2E_TOL)
    rep.e2e.append(
        [
            name,
            fmt(t_plain),
            fmt(times["torch"]),
            fmt(times["triton"]),
            ratio(times["torch"], t_plain),
            ratio(times["triton"], t_plain),
            ratio(times["torch"], times["triton"]),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1"
    )
    parser.add_argument(
        "--out", type=Path, help="markdown output (default bench/results/gpu-latest.md)"
    )
    parser.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end model case")
    args = parser.parse_args()
    if args.out is None:
        here = Path(__file__).resolve().parent
        args.out = (
            Path(tempfile.gettempdir()) / "sdi-gpu-smoke.md"
            if SMOKE
            else here.parent / "results" / "gpu-latest.md"
        )
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to check the script on the CPU")

    device_name = "CPU, Triton interpreter (smoke run)" if SMOKE else torch.cuda.get_device_name()
    header = [
        "# sdi GPU benchmark"
        + (" (SMOKE: tiny shapes, CPU interpreter, timings meaningless)" if SMOKE else ""),
        "",
        f"- device: {device_name}",
        f"- torch {torch.__version__}, triton {triton.__version__}, "
        f"python {sys.version.split()[0]}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "- default TensorSketch path (used end to end, from the compile-time roofline): "
        + ", ".join(
            f"m={m}: {default_path(m, DEVICE)!r}" for m in sorted({c[-1] for c in LINEAR_CASES})
        ),
    ]
    for line in header:
        print(line, flush=True)
    bw = copy_bandwidth()
    header.append(
        f"- copy bandwidth (read + write, empty_like(x).copy_(x) of "
        f"{COPY_BYTES / 2**20:.0f} MiB): {bw / 1e9:.0f} GB/s"
    )
    log(header[-1][2:])
    rep = Report(args.out, header)
    gen = torch.Generator().manual_seed(0)

    kernel_tests(rep)
    rep.write()
    for case in LINEAR_CASES:
        try:
            linear_case(rep, gen, bw, case)
        except Exception:
            rep.error(f"linear case {case}")
        rep.write()
        log(f"done linear case {case}")
    try:
        embedding_case(rep, gen, bw)
    except Exception:
        rep.error("embedding case")
    rep.write()
    if not args.skip_e2e:
        try:
            end_to_end_case(rep)
        except Exception:
            rep.error("end-to-end case")
        rep.write()

    print("\n" + rep.render(), flush=True)
    log(f"wrote {args.out}")
    if rep.failed or rep.errors:
        print(
            f"FAILED: {len(rep.failed)} checks off tolerance, {len(rep.errors)} errors", flush=True
        )
        return 1
    return 0


START = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
