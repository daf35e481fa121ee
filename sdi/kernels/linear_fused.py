"""The fused TensorSketch path of a Linear use: on-chip CountSketch + four-step DFT, one kernel.

One kernel per (example, token chunk) reads each token's activation and grad-output row once,
count-sketches both on chip (a gather through the padded bucket lists), and transforms them
together with a four-step DFT on ``tl.dot`` (real and imaginary parts kept separate). Two real
signals share one complex transform: with ``z = c_a + i*alpha*c_g`` and ``Z = DFT(z)``::

    A[k] * G[k] = (Z[k]^2 - conj(Z[-k])^2) / (4i alpha)

so the kernel accumulates only ``S[k] = sum_t Z_t[k]^2 / alpha_t`` (no mirrored index needed on
chip) and writes ``S`` per (example, chunk); a tiny torch epilogue sums the chunks, forms
``(S[k] - conj(S[-k])) / 4i`` and runs the inverse transform. ``alpha_t`` is a power of two that
balances the two sides' norms per token, so the squares do not swamp the cross term when
activations and grad-outputs differ in scale by many orders of magnitude. Needs ``m`` a power
of two with ``16 <= m <= 4096``.

Four-step DFT (``m = m1*m2``, ``n = m2*n1 + n2``, ``k = k1 + m1*k2``, ``w_q = exp(-2 pi i / q)``)::

    X[k1 + m1 k2] = sum_n2 w_m2^(n2 k2) * w_m^(n2 k1) * sum_n1 w_m1^(n1 k1) * c[m2 n1 + n2]

i.e. with ``C[n2, n1] = c[m2 n1 + n2]``: ``P = C @ F1``, ``Q = P * Tw``, ``X = F2 @ Q``, where
``F1 (m1, m1)``, ``F2 (m2, m2)`` and ``Tw[n2, k1] = w_m^(n2 k1)`` are cached per ``(m, device)``,
and ``X[k2, k1]`` is the spectrum at ``k = k1 + m1 k2``: row-major order, no transposes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..sketch import CountSketchHash, TensorSketchHash
from .utils import GATHER_UNROLL, bucket_codes, gather_bucket_sum, table_cache, token_splits

FUSED_MIN_M = 16
FUSED_MAX_M = 4096

# Precision of the fused path's fp32 DFT products on tensor cores: three TF32 passes give about
# fp32 accuracy (plain "tf32" would cost ~1e-3 relative error for a third of the tensor-core work).
_DFT_PRECISION = "tf32x3"

_DFT_CACHE: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}


def _fused_factors(m: int) -> tuple[int, int]:
    """``m = m1 * m2`` with ``m1 >= m2``, both powers of two, as square as possible."""
    p = int(math.log2(m))
    return 1 << (p - p // 2), 1 << (p // 2)


def _dft_constants(m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(f1_re, f1_im, f2_re, f2_im, tw_re, tw_im, neg_k)`` for the four-step DFT, cached.

    ``F1 (m1, m1)``, ``F2 (m2, m2)``, ``Tw (m2, m1)`` as fp32; angles are reduced exactly in
    integers mod the transform length before the float64 sin/cos. ``neg_k (m//2 + 1,)`` int64 is
    ``(-k) mod m``, used by the epilogue.
    """
    key = (m, str(device))
    if key not in _DFT_CACHE:
        m1, m2 = _fused_factors(m)

        def unit_roots(rows: int, cols: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
            exponent = (torch.arange(rows)[:, None] * torch.arange(cols)[None, :]) % q
            angle = exponent.to(torch.float64) * (-2.0 * math.pi / q)
            return (
                torch.cos(angle).to(device=device, dtype=torch.float32).contiguous(),
                torch.sin(angle).to(device=device, dtype=torch.float32).contiguous(),
            )

        neg_k = ((-torch.arange(m // 2 + 1)) % m).to(device)
        _DFT_CACHE[key] = (
            *unit_roots(m1, m1, m1),
            *unit_roots(m2, m2, m2),
            *unit_roots(m2, m1, m),
            neg_k,
        )
    return _DFT_CACHE[key]


def _fused_codes(table: CountSketchHash, m1: int, m2: int) -> tuple[torch.Tensor, int]:
    """Bucket lists laid out for the four-step input, ``(width, m2, m1)`` int32, cached per table:
    ``[slot, n2, n1]`` lists bucket ``m2*n1 + n2``."""
    entry = table_cache(table)
    key = ("codes_four_step", m1, m2)
    if key not in entry:
        codes, width = bucket_codes(table)
        entry[key] = (codes.view(width, m1, m2).transpose(1, 2).contiguous(), width)
    return entry[key]


@triton.jit
def _mm(x, y, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``x @ y`` for fp32 tiles; ``tl.dot`` needs every dimension >= 16, tiny ones use a sum."""
    if USE_DOT:
        prod = tl.dot(x, y, input_precision=PRECISION)
    else:
        prod = tl.sum(x[:, :, None] * y[None, :, :], axis=1)
    return prod


@triton.jit
def _fused_linear_kernel(
    a_ptr,  # (B, T, d_in) contiguous
    g_ptr,  # (B, T, d_out) contiguous
    codes_a_ptr,  # (width_a, M2, M1) int32
    codes_g_ptr,  # (width_g, M2, M1) int32
    width_a,
    width_g,
    f1r_ptr,
    f1i_ptr,
    f2r_ptr,
    f2i_ptr,
    twr_ptr,
    twi_ptr,
    part_ptr,  # (B, n_chunks, 2, M) fp32: S = sum_t Z_t^2 / alpha_t, real plane then imaginary
    T,
    d_in,
    d_out,
    n_chunks,
    tokens_per_chunk,
    M1: tl.constexpr,
    M2: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    UNROLL: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    r1 = tl.arange(0, M1)
    r2 = tl.arange(0, M2)
    offs = r2[:, None] * M1 + r1[None, :]  # (M2, M1) row-major, also the spectrum order
    f1 = r1[:, None] * M1 + r1[None, :]
    f2 = r2[:, None] * M2 + r2[None, :]
    f1r = tl.load(f1r_ptr + f1)
    f1i = tl.load(f1i_ptr + f1)
    f2r = tl.load(f2r_ptr + f2)
    f2i = tl.load(f2i_ptr + f2)
    twr = tl.load(twr_ptr + offs)
    twi = tl.load(twi_ptr + offs)
    s_re = tl.zeros((M2, M1), dtype=tl.float32)
    s_im = tl.zeros((M2, M1), dtype=tl.float32)
    t_lo = chunk * tokens_per_chunk
    t_hi = tl.minimum(t_lo + tokens_per_chunk, T)
    for t in range(t_lo, t_hi):
        row = (b * T + t).to(tl.int64)
        zero = tl.zeros((M2, M1), dtype=tl.float32)
        c_a = gather_bucket_sum(
            zero, a_ptr + row * d_in, offs >= 0, codes_a_ptr, offs, M1 * M2, width_a, UNROLL
        )
        c_g = gather_bucket_sum(
            zero, g_ptr + row * d_out, offs >= 0, codes_g_ptr, offs, M1 * M2, width_g, UNROLL
        )
        # alpha = 2^trunc(log2(|c_a| / |c_g|)): a power of two, exact to multiply and divide by.
        ss_a = tl.sum(tl.sum(c_a * c_a, axis=1), axis=0)
        ss_g = tl.sum(tl.sum(c_g * c_g, axis=1), axis=0)
        both = (ss_a > 0) & (ss_g > 0)
        log_ratio = 0.5 * (tl.log2(tl.where(both, ss_a, 1.0)) - tl.log2(tl.where(both, ss_g, 1.0)))
        log_ratio = tl.minimum(tl.maximum(log_ratio, -64.0), 64.0)
        alpha = tl.exp2(log_ratio.to(tl.int32).to(tl.float32))
        c_i = c_g * alpha
        # P = C @ F1 (complex C = c_a + i c_i)
        p_re = _mm(c_a, f1r, USE_DOT, PRECISION) - _mm(c_i, f1i, USE_DOT, PRECISION)
        p_im = _mm(c_a, f1i, USE_DOT, PRECISION) + _mm(c_i, f1r, USE_DOT, PRECISION)
        # Q = P * Tw
        q_re = p_re * twr - p_im * twi
        q_im = p_re * twi + p_im * twr
        # X = F2 @ Q
        x_re = _mm(f2r, q_re, USE_DOT, PRECISION) - _mm(f2i, q_im, USE_DOT, PRECISION)
        x_im = _mm(f2r, q_im, USE_DOT, PRECISION) + _mm(f2i, q_re, USE_DOT, PRECISION)
        # A token with an all-zero side contributes exactly nothing; skipping it also keeps the
        # rounding noise of its unbalanced square (e.g. the last position's zero grad) out of S.
        inv_alpha = tl.where(both, 1.0 / alpha, 0.0)
        s_re += (x_re * x_re - x_im * x_im) * inv_alpha
        s_im += 2.0 * x_re * x_im * inv_alpha
    dst = part_ptr + (b * n_chunks + chunk).to(tl.int64) * (2 * M1 * M2) + offs
    tl.store(dst, s_re)
    tl.store(dst + M1 * M2, s_im)


def linear_fused(
    a: torch.Tensor, g: torch.Tensor, table: TensorSketchHash, out: torch.Tensor
) -> torch.Tensor:
    m = table.m
    if m & (m - 1) or not FUSED_MIN_M <= m <= FUSED_MAX_M:
        raise ValueError(
            f"tensor_sketch_linear(path='fused') needs m a power of two in "
            f"[{FUSED_MIN_M}, {FUSED_MAX_M}], got m={m}; use path='simple' (any m)"
        )
    n_b, n_t, d_in = a.shape
    d_out = g.shape[-1]
    m1, m2 = _fused_factors(m)
    f1r, f1i, f2r, f2i, twr, twi, neg_k = _dft_constants(m, a.device)
    codes_a, width_a = _fused_codes(table.inp, m1, m2)
    codes_g, width_g = _fused_codes(table.out, m1, m2)
    n_chunks, per_chunk = token_splits(n_t, n_b, a.device)
    part = torch.empty(n_b, n_chunks, 2, m, dtype=torch.float32, device=a.device)
    _fused_linear_kernel[(n_b, n_chunks)](
        a,
        g,
        codes_a,
        codes_g,
        width_a,
        width_g,
        f1r,
        f1i,
        f2r,
        f2i,
        twr,
        twi,
        part,
        n_t,
        d_in,
        d_out,
        n_chunks,
        per_chunk,
        M1=m1,
        M2=m2,
        USE_DOT=min(m1, m2) >= 16,
        PRECISION=_DFT_PRECISION,
        UNROLL=GATHER_UNROLL,
        num_warps=4 if m <= 512 else (8 if m <= 2048 else 16),
    )
    s = part.sum(dim=1)  # (B, 2, m)
    s = torch.complex(s[:, 0], s[:, 1])
    spec = (s[:, : m // 2 + 1] - s[:, neg_k].conj()) * -0.25j  # (S[k] - conj(S[-k])) / 4i
    return torch.fft.irfft(spec, n=m, dim=-1, out=out)
