"""Compile-time kernel report, no GPU and no network: ``make kernel-report``.

For every Triton kernel at every launch configuration its launcher picks for m in
{256, 512, 1024, 2048, 4096} and the bench shapes (the configs come from the launchers' own
``*_config`` functions, via :func:`sdi.kernels.compile_check.launch_specs`), compiled for sm_90a
(H100/H200) and sm_100a (B200): registers per thread, spill bytes, shared memory, and the CTAs per
SM those allow. Then a roofline estimate per call of each Linear path at the paper-like shape
(B=8, T=2048, d_in=d_out=4096, bf16 in, fp32 out, m=2048) on an H200, and the default path the
estimate implies (:func:`sdi.kernels.linear.predicted_ms`). Writes ``bench/results/kernels.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402

from bench.cases import LINEAR_CASES, PAPER_LINEAR  # noqa: E402
from sdi.kernels import compile_check, roofline  # noqa: E402
from sdi.kernels.linear import default_path  # noqa: E402

M_VALUES = (256, 512, 1024, 2048, 4096)


def kernel_table(targets) -> tuple[list[str], list[str]]:
    """Markdown rows of the compile table, and the failures (spills, errors)."""
    rows_per_case = sorted({b * t for b, t, *_ in LINEAR_CASES})
    m_values = sorted(set(M_VALUES) | {case[-1] for case in LINEAR_CASES})
    specs = compile_check.launch_specs(m_values, rows_per_case)
    lines = [
        "| kernel | config | target | registers | spill stores / loads (B) | stack (B) "
        "| shared (KB) | CTAs/SM | warps/SM | bound by |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    problems = []
    for spec in specs:
        for target in targets:
            t0 = time.perf_counter()
            refused = compile_check.not_launched(spec, target)
            if refused:
                lines.append(
                    f"| {spec.kernel} | {spec.config} | {target} | not launched: {refused} |"
                )
                continue
            try:
                st = compile_check.compile_stats(spec, target)
            except Exception as err:  # noqa: BLE001 -- reported in the table
                lines.append(f"| {spec.kernel} | {spec.config} | {target} | error: {err} |")
                problems.append(f"{spec.kernel} {spec.config} {target}: {err}")
                continue
            ctas, bound = compile_check.occupancy(st, spec.num_warps)
            lines.append(
                f"| {spec.kernel} | {spec.config} | {target} | {st.registers} "
                f"| {st.spill_stores} / {st.spill_loads} | {st.stack} | {st.shared / 1024:.1f} "
                f"| {ctas} | {ctas * spec.num_warps} | {bound}"
                f"{' **(PTX is a trap)**' if st.traps else ''} |"
            )
            if st.spills:
                problems.append(f"{spec.kernel} {spec.config} {target}: {st.spills} spill bytes")
            if st.traps:
                problems.append(
                    f"{spec.kernel} {spec.config} {target}: the PTX is a `trap` "
                    f"({st.traps}x): the compiler found undefined behaviour"
                )
            print(
                f"  {spec.kernel:13s} {spec.config:55s} {target}: {st.registers} regs, "
                f"{st.spills} B spills, {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
    return lines, problems


def roofline_table() -> list[str]:
    lines = [
        "| case | path | HBM bytes (MB) | tensor-core FLOP (G) | CUDA-core FLOP (G) "
        "| HBM time (ms) | compute time (ms) | predicted (ms) | / read-once floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in LINEAR_CASES:
        n_b, n_t, d_in, d_out, m = case
        floor = roofline.read_once_floor_ms(*case)
        for path in ("simple", "fused"):
            est = roofline.linear_estimate(path, *case)
            if est is None:
                continue
            lines.append(
                f"| B={n_b} T={n_t} d_in={d_in} d_out={d_out} m={m} | {path} "
                f"| {est.bytes / 1e6:.0f} | {est.tc_flops / 1e9:.1f} | {est.cuda_flops / 1e9:.1f} "
                f"| {est.hbm_ms:.3f} | {est.compute_ms:.3f} | {est.ms:.3f} "
                f"| {est.ms / floor:.2f}x |"
            )
        lines.append(
            f"| (read-once floor: a and g once) | | "
            f"{roofline.input_bytes(*case) / 1e6:.0f} | | | {floor:.3f} | | {floor:.3f} | 1.00x |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here.parent / "results" / "kernels.md")
    parser.add_argument("--targets", default="sm_90a,sm_100a")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unsupported = {t: compile_check.ptxas_supports(compile_check.TARGETS[t]) for t in targets}
    skipped = {t: why for t, (ok, why) in unsupported.items() if not ok}
    targets = [t for t in targets if t not in skipped]
    print(f"Triton {triton.__version__}; targets {targets}; skipped {skipped}", flush=True)
    table, problems = kernel_table(targets)
    paper = PAPER_LINEAR
    lim = compile_check.SM_LIMITS
    hw = roofline.H200
    text = [
        "# Triton kernels compiled for NVIDIA targets (no GPU)",
        "",
        f"- made by `make kernel-report` (`python bench/gpu/kernel_report.py`), "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Triton {triton.__version__}; ptxas: the one in the Triton wheel "
        f"(`ptxas -v --gpu-name <target>` on Triton's PTX); shared memory: Triton's metadata",
        *(f"- {t} skipped: {why}" for t, why in skipped.items()),
        "- configurations: exactly those the launchers pick (`count_sketch_config`, "
        "`spectrum_dot_config`, `embedding_config`, `fused_config`, called by the launchers and "
        f"by this report) for m in {list(M_VALUES)} and the bench shapes of `bench/cases.py`; "
        "bf16 inputs",
        f"- CTAs/SM from the per-SM limits of compute capability 9.0 (H100/H200) and 10.0 (B200), "
        f"which are equal (CUDA C++ Programming Guide, technical specifications): "
        f"{lim['registers'] // 1024}K 32-bit registers (allocated per warp in units of "
        f"{lim['register_alloc_unit']}), {lim['shared_per_sm'] // 1024} KB shared memory "
        f"({lim['shared_per_block'] // 1024} KB usable per block, 1 KB reserved per CTA), "
        f"{lim['threads']} threads, {lim['ctas']} CTAs",
        "",
        "## Registers, spills, shared memory, occupancy",
        "",
        *table,
        "",
        "## Roofline per call on an H200",
        "",
        f"Numbers used: HBM {hw['hbm_bytes_per_s'] / 1e12:.1f} TB/s; dense BF16 tensor core "
        f"{hw['bf16_tc_flops'] / 1e12:.1f} TFLOPS; dense TF32 {hw['tf32_tc_flops'] / 1e12:.1f} "
        f"TFLOPS; FP32 CUDA cores {hw['fp32_flops'] / 1e12:.0f} TFLOPS (NVIDIA H200 datasheet; "
        "the tensor-core figures there are quoted with sparsity, the dense rate is half). "
        "Predicted time = max(HBM time, compute time): perfect overlap, no launch overhead; "
        "cuFFT counted as `5 n log2 n` FLOP per length-n complex transform and as its bytes.",
        "",
        "Bytes counted: simple = read a, g (bf16) + write and read back the two fp32 "
        "CountSketches + the two spectra (rfft writes, spectrum_dot reads) + the (B, m) output; "
        "fused = read a, g once + the (B, n_chunks, 2, m) partial sums + the output (bucket lists "
        "and DFT factors are a few hundred KB, served from L2). Fused FLOP: per token "
        "`8 m (m1 + m2)` (four real products per step, `2 m m1` and `2 m m2` FLOP each), times "
        "3 bf16 passes (hi/lo split); below m = 256 one fp32 pass on CUDA cores. The gather's "
        "scattered loads are not modelled (they read the bytes counted once).",
        "",
        f"Paper-like shape: B={paper[0]}, T={paper[1]}, d_in={paper[2]}, d_out={paper[3]}, "
        f"m={paper[4]}, bf16 in, fp32 out.",
        "",
        *roofline_table(),
        "",
        "## Default Linear path until a GPU measures",
        "",
        "`sdi.kernels.linear.default_path(m)`: `fused` where it is supported (m a power of two "
        "in [16, 4096]) and its predicted time at the paper-like shape (scaled to m) is below "
        "the simple path's; `simple` otherwise. `bash bench/gpu/gpu.sh` prints the prediction "
        "beside each measured time and the default the measurements imply.",
        "",
        "| m | predicted simple (ms) | predicted fused (ms) | default |",
        "|---:|---:|---:|---|",
    ]
    for m in M_VALUES:
        case = (*paper[:4], m)
        simple = roofline.linear_estimate("simple", *case)
        fused = roofline.linear_estimate("fused", *case)
        text.append(
            f"| {m} | {simple.ms:.3f} | {fused.ms if fused else float('nan'):.3f} "
            f"| {default_path(m)} |"
        )
    if problems:
        text += ["", "## Problems", "", *(f"- {p}" for p in problems)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = args.out.with_suffix(".notes.md")
    body = "\n".join(text) + "\n"
    if extra.exists():
        body += "\n" + extra.read_text()
    args.out.write_text(body)
    print(f"wrote {args.out}" + (f"; PROBLEMS: {problems}" if problems else ""), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
