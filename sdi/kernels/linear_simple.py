"""The simple TensorSketch path of a Linear use: Triton CountSketch, cuFFT, spectrum product.

For activations ``a (B, T, d_in)`` and grad-outputs ``g (B, T, d_out)``::

    TS(G_b^T A_b) = irfft( sum_t rfft(CS_out(g[b, t])) * rfft(CS_in(a[b, t])) )        (B, m) fp32

Both sides are count-sketched by :mod:`sdi.kernels.count_sketch` into ``(B*T, m)`` fp32, transformed
by ``torch.fft.rfft`` (cuFFT), and :func:`spectrum_dot` multiplies the two spectra and sums them over
tokens in one kernel without writing the per-token products. Any ``m >= 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..sketch import TensorSketchHash
from .count_sketch import count_sketch_rows
from .utils import check_out, sum_chunks, token_splits


class SpectrumDotConfig(NamedTuple):
    BLOCK_F: int
    num_warps: int


def spectrum_dot_config(n_freqs: int) -> SpectrumDotConfig:
    """The launch configuration :func:`spectrum_dot` uses for ``n_freqs`` frequencies (also what
    bench/gpu/kernel_report.py compiles)."""
    return SpectrumDotConfig(BLOCK_F=min(256, triton.next_power_of_2(max(n_freqs, 1))), num_warps=4)


@triton.jit
def _spectrum_dot_kernel(
    a_ptr,  # (B, T, F, 2) fp32: rfft of CS_in(a), real/imag interleaved
    g_ptr,  # (B, T, F, 2) fp32: rfft of CS_out(g)
    part_ptr,  # (n_chunks, B, F, 2) fp32: per-chunk sums over tokens
    B,
    T,
    F,
    tokens_per_chunk,
    BLOCK_F: tl.constexpr,
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    chunk = tl.program_id(2)
    f_ok = f < F
    t_lo = chunk * tokens_per_chunk
    t_hi = tl.minimum(t_lo + tokens_per_chunk, T)
    acc_re = tl.zeros((BLOCK_F,), dtype=tl.float32)
    acc_im = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        off = ((b * T + t).to(tl.int64) * F + f) * 2
        ar = tl.load(a_ptr + off, mask=f_ok, other=0.0)
        ai = tl.load(a_ptr + off + 1, mask=f_ok, other=0.0)
        gr = tl.load(g_ptr + off, mask=f_ok, other=0.0)
        gi = tl.load(g_ptr + off + 1, mask=f_ok, other=0.0)
        acc_re += ar * gr - ai * gi
        acc_im += ar * gi + ai * gr
    dst = ((chunk * B + b).to(tl.int64) * F + f) * 2
    tl.store(part_ptr + dst, acc_re, mask=f_ok)
    tl.store(part_ptr + dst + 1, acc_im, mask=f_ok)


def spectrum_dot(
    spec_a: torch.Tensor, spec_g: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_t spec_a[b, t] * spec_g[b, t]`` for complex spectra given as real views.

    spec_a, spec_g: ``(B, T, F, 2)`` fp32 contiguous (``torch.view_as_real`` of ``(B, T, F)``
    complex64). Returns ``(B, F, 2)`` fp32 (``out`` if given: contiguous, that shape).
    """
    n_b, n_t, n_f, _ = spec_a.shape
    out = check_out("spectrum_dot", out, (n_b, n_f, 2), spec_a.device)
    if n_b == 0 or n_t == 0 or n_f == 0:
        return out.zero_()
    cfg = spectrum_dot_config(n_f)
    n_fblocks = triton.cdiv(n_f, cfg.BLOCK_F)
    n_chunks, per_chunk = token_splits(n_t, n_b * n_fblocks, spec_a.device)
    part = out.unsqueeze(0) if n_chunks == 1 else spec_a.new_empty(n_chunks, n_b, n_f, 2)
    _spectrum_dot_kernel[(n_b, n_fblocks, n_chunks)](
        spec_a,
        spec_g,
        part,
        n_b,
        n_t,
        n_f,
        per_chunk,
        BLOCK_F=cfg.BLOCK_F,
        num_warps=cfg.num_warps,
    )
    return sum_chunks(part, out)


def linear_simple(
    a: torch.Tensor, g: torch.Tensor, table: TensorSketchHash, out: torch.Tensor
) -> torch.Tensor:
    """TensorSketch of ``G_b^T A_b`` into ``out (B, m)`` fp32; a, g contiguous, checked, T > 0."""
    n_b, n_t, _ = a.shape
    m = table.m
    cs_a = count_sketch_rows(
        a.reshape(n_b * n_t, -1), table.inp, a.new_empty(n_b * n_t, m, dtype=torch.float32)
    )
    cs_g = count_sketch_rows(
        g.reshape(n_b * n_t, -1), table.out, a.new_empty(n_b * n_t, m, dtype=torch.float32)
    )
    spec_a = torch.view_as_real(torch.fft.rfft(cs_a.view(n_b, n_t, m), dim=-1))
    del cs_a
    spec_g = torch.view_as_real(torch.fft.rfft(cs_g.view(n_b, n_t, m), dim=-1))
    del cs_g
    spec = torch.view_as_complex(spectrum_dot(spec_a, spec_g))
    return torch.fft.irfft(spec, n=m, dim=-1, out=out)
