"""Roofline estimate of one TensorSketch Linear call on an H200: bytes moved, FLOP, time.

The model behind the default Linear path (:func:`sdi.kernels.linear.default_path`) until a GPU
measures, and the "predicted" column ``bench/gpu/gpu.py`` prints beside each measured time.
Predicted time = max(HBM time, compute time): perfect overlap, no launch overhead, caches ignored
except that tables and DFT factors (a few hundred KB) are served from L2. Inputs assumed bf16
(2 bytes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

# NVIDIA H200 SXM datasheet: HBM3e 4.8 TB/s; BF16 tensor core 1979 TFLOPS and TF32 989 TFLOPS
# *with sparsity* (dense: half); FP32 67 TFLOPS.
H200 = {
    "hbm_bytes_per_s": 4.8e12,
    "bf16_tc_flops": 989.4e12,
    "tf32_tc_flops": 494.7e12,
    "fp32_flops": 67e12,
    "sms": 132,
}

IN_BYTES = 2  # bf16 activations and grad-outputs


class Estimate(NamedTuple):
    bytes: float
    tc_flops: float  # on bf16 tensor cores
    cuda_flops: float  # on fp32 CUDA cores
    hbm_ms: float
    compute_ms: float

    @property
    def ms(self) -> float:
        return max(self.hbm_ms, self.compute_ms)


def input_bytes(n_b: int, n_t: int, d_in: int, d_out: int, m: int) -> float:
    return n_b * n_t * (d_in + d_out) * IN_BYTES


def read_once_floor_ms(n_b: int, n_t: int, d_in: int, d_out: int, m: int, hw=H200) -> float:
    """Reading the activations and grad-outputs once from HBM: no Linear path can beat it."""
    return input_bytes(n_b, n_t, d_in, d_out, m) / hw["hbm_bytes_per_s"] * 1e3


def _estimate(nbytes: float, tc: float, cuda: float, hw) -> Estimate:
    compute = tc / hw["bf16_tc_flops"] + cuda / hw["fp32_flops"]
    return Estimate(nbytes, tc, cuda, nbytes / hw["hbm_bytes_per_s"] * 1e3, compute * 1e3)


def linear_estimate(
    path: str, n_b: int, n_t: int, d_in: int, d_out: int, m: int, hw=H200
) -> Estimate | None:
    """The estimate of ``path`` (``"simple"`` / ``"fused"``) for one call; None if unsupported."""
    from .linear_fused import FUSED_MAX_M, FUSED_MIN_M, fused_factors

    n = n_b * n_t
    n_f = m // 2 + 1
    out = n_b * m * 4
    gather_adds = n * (d_in + d_out)
    if path == "simple":
        sketches = 2 * n * m * 4  # two fp32 CountSketches, written then read by rfft
        spectra = 2 * n * n_f * 8  # two complex64 spectra, written then read by spectrum_dot
        nbytes = input_bytes(n_b, n_t, d_in, d_out, m) + 2 * sketches + 2 * spectra + out
        fft = 2 * n * 2.5 * m * math.log2(m)  # a real transform: half a complex 5 n log2 n
        return _estimate(nbytes, 0.0, gather_adds + fft + 8 * n * n_f, hw)
    if path != "fused":
        raise ValueError(f"unknown path {path!r}")
    if m & (m - 1) or not FUSED_MIN_M <= m <= FUSED_MAX_M:
        return None
    m1, m2 = fused_factors(m)
    n_chunks = max(1, -(-4 * hw["sms"] // n_b))
    nbytes = input_bytes(n_b, n_t, d_in, d_out, m) + n_b * n_chunks * 2 * m * 4 + out
    dft = n * 8 * m * (m1 + m2)  # four real products per step, 2 m m1 + 2 m m2 FLOP each
    if m2 >= 16:
        return _estimate(nbytes, 3 * dft, gather_adds, hw)  # three bf16 passes
    return _estimate(nbytes, 0.0, gather_adds + dft, hw)
