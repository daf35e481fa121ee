"""Every Triton kernel compiles for sm_90a (H100/H200) and sm_100a (B200) at each configuration its
launcher picks, with zero spill bytes -- on the CPU, no GPU (:mod:`sdi.kernels.compile_check`).

The configurations come from the launchers' own ``*_config`` functions, for every m in
{16, ..., 16384} the launchers accept and every bench case; duplicates compile once. All compile
in one child process (a clean environment: other test files set ``TRITON_INTERPRET=1``, under
which kernels are interpreter functions; and a compiler abort fails the tests, not the run).
Skipped, saying why, only where the installed Triton wheel has no ptxas for a target, or where
the launcher never runs that kernel on that target.
"""

import pytest

pytest.importorskip("triton")

from sdi.kernels import compile_check  # noqa: E402
from sdi.kernels.linear_fused import fused_config  # noqa: E402

# Row counts B*T of the GPU bench cases, and a few small ones (the count_sketch tile shrinks).
M_VALUES = [2**p for p in range(4, 15)]
ROWS = [1, 5, 16, 8 * 2048, 32 * 512]
SPECS = compile_check.launch_specs(M_VALUES, ROWS)
TARGETS = sorted(compile_check.TARGETS)


@pytest.fixture(scope="module")
def compiled():
    return compile_check.stats_in_subprocess(M_VALUES, ROWS, TARGETS)


def test_specs_cover_every_kernel_and_fused_config():
    kernels = {s.kernel for s in SPECS}
    assert kernels == {"count_sketch", "spectrum_dot", "embedding", "linear_fused"}
    fused = {s.config for s in SPECS if s.kernel == "linear_fused"}
    assert len(fused) == len([m for m in M_VALUES if m <= 4096])  # one per supported m
    for m in (16, 256, 2048, 4096):
        cfg = fused_config(m)
        assert any(f"m={m} " in c and f"BLOCK_T={cfg.BLOCK_T}," in c for c in fused)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "index", range(len(SPECS)), ids=lambda i: f"{SPECS[i].kernel}[{SPECS[i].config}]"
)
def test_compiles_without_spills(compiled, index, target):
    spec, rec = SPECS[index], compiled[(index, target)]
    if "unsupported" in rec:
        pytest.skip(rec["unsupported"])
    if "refused" in rec:  # the launcher falls back to path="simple" there
        pytest.skip(f"not launched: {rec['refused']}")
    assert "error" not in rec, f"{spec.kernel} [{spec.config}] on {target}: {rec['error']}"
    stats = compile_check.CompileStats(**rec["stats"])
    assert stats.registers <= 255
    assert stats.spills == 0, f"{spec.kernel} [{spec.config}] on {target}: {stats}"
    # A kernel LLVM reduced to `trap` (it proved undefined behaviour) has no spills either.
    assert stats.traps == 0, f"{spec.kernel} [{spec.config}] on {target} compiles to a trap"
    assert stats.shared <= compile_check.SM_LIMITS["shared_per_block"]
    ctas, _ = compile_check.occupancy(stats, spec.num_warps)
    assert ctas >= 1


def test_occupancy_arithmetic():
    """Against hand-computed limits: 128 regs x 4 warps -> 4 CTAs; 255 regs x 8 warps -> 1."""
    st = compile_check.CompileStats(128, 0, 0, 0, 0)
    assert compile_check.occupancy(st, 4) == (4, "registers")
    st = compile_check.CompileStats(255, 0, 0, 0, 0)
    assert compile_check.occupancy(st, 8) == (1, "registers")
    st = compile_check.CompileStats(32, 0, 0, 0, 100 * 1024)  # 2 x (100 + 1) KB fit in 228 KB
    assert compile_check.occupancy(st, 4) == (2, "shared")
    st = compile_check.CompileStats(16, 0, 0, 0, 0)
    assert compile_check.occupancy(st, 1) == (32, "CTA slots")


def test_fused_refusals_are_named():
    """Sizes the fused kernel does not take, and the one (target, Triton) pair known to trap."""
    from sdi.kernels.linear_fused import _triton_version, fused_unsupported

    assert "power of two" in fused_unsupported(96)
    assert "power of two" in fused_unsupported(8192)
    assert fused_unsupported(4096) is None and fused_unsupported(4096, (9, 0)) is None
    trap = fused_unsupported(4096, (10, 0))
    assert (trap is None) == (_triton_version() >= (3, 9)), trap
    assert fused_unsupported(2048, (10, 0)) is None
