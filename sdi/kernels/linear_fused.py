"""The fused TensorSketch path of a Linear use: on-chip CountSketch + four-step DFT, one kernel.

Each program owns one example and a chunk of its tokens, and walks the chunk ``BLOCK_T`` tokens at
a time: it reads each token's activation and grad-output row once, count-sketches both on chip
(:func:`sdi.kernels.utils.gather_bucket_sum`), and transforms the whole token block with two
``tl.dot`` tile products (real and imaginary parts kept separate). Two real signals share one
complex transform: with ``z = c_a + i*alpha*c_g`` and ``Z = DFT(z)``::

    A[k] * G[k] = (Z[k]^2 - conj(Z[-k])^2) / (4i alpha)

so the kernel accumulates only ``S[k] = sum_t Z_t[k]^2 / alpha_t`` (no mirrored index needed on
chip) and writes ``S`` per (example, chunk); a tiny torch epilogue sums the chunks, forms
``(S[k] - conj(S[-k])) / 4i`` and runs the inverse transform. ``alpha_t`` is a power of two that
balances the two sides' norms per token, so the squares do not swamp the cross term when
activations and grad-outputs differ in scale by many orders of magnitude. Needs ``m`` a power
of two with ``16 <= m <= 4096``.

Four-step DFT (``m = m1*m2``, ``n = m2*n1 + n2``, ``k = k1 + m1*k2``, ``w_q = exp(-2 pi i / q)``)::

    X[k1 + m1 k2] = sum_n2 w_m2^(n2 k2) * w_m^(n2 k1) * sum_n1 w_m1^(n1 k1) * c[m2 n1 + n2]

A token block is held as ``C[n1, (t, n2)] = c_t[m2 n1 + n2]``, an ``(m1, BLOCK_T*m2)`` tile (the
natural row-major view of each ``c_t``, tokens side by side), so that both products are plain
tiles with the tokens stacked into a matrix dimension and no transpose anywhere::

    P = F1 @ C                  (m1, m1) @ (m1, BLOCK_T*m2)      tokens along N
    Q = P * Tw[k1, n2]          the twiddle, broadcast over tokens
    X = Q.view(m1*BLOCK_T, m2) @ F2                              tokens along M

``X[(k1, t), k2]`` is token ``t``'s spectrum at ``k = k1 + m1 k2``. ``F1``, ``F2`` (symmetric) and
``Tw`` are cached per ``(m, device)`` and read from global memory (L2) per token block, not held in
registers across the loop.

Precision: the products run on bf16 tensor cores as three passes (``x = hi + lo`` with ``hi``,
``lo`` bf16; ``x y ~ hi_x hi_y + hi_x lo_y + lo_x hi_y``, accumulated in fp32), about 2^-16
relative error per product -- near fp32 accuracy at the bf16 rate, twice the TF32 rate. The
interpreter (no bf16 dot) runs the same split with the parts held in fp32.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..sketch import TensorSketchHash
from .utils import bucket_codes, gather_bucket_sum, token_splits

FUSED_MIN_M = 16
FUSED_MAX_M = 4096


class FusedConfig(NamedTuple):
    BLOCK_T: int  # tokens per block: stacked into the DFT tiles
    BLOCK_K: int  # rows n1 of C gathered (and columns of F1 read) per step of the first product
    UNROLL: int  # bucket slots gathered per loop step (each code load feeds BLOCK_T value loads)
    num_warps: int


# Largest m2: F2 (m2 x m2, four bf16 parts) is the B operand of the second product for the whole
# loop; at m2 = 64 it alone takes 32 registers per thread of 8 warps and m = 4096 spills.
# F1 is streamed in K-blocks, so a longer m1 costs FLOP (8 m (m1 + m2) per token), not registers.
MAX_M2 = 32


def fused_factors(m: int) -> tuple[int, int]:
    """``m = m1 * m2`` with ``m1 >= m2``, both powers of two, as square as possible with
    ``m2 <= MAX_M2``."""
    p = int(math.log2(m))
    m2 = min(1 << (p // 2), MAX_M2)
    return m // m2, m2


def fused_config(m: int) -> FusedConfig:
    """The launch configuration :func:`linear_fused` uses for sketch size ``m`` (also what
    bench/gpu/kernel_report.py compiles and tests/test_kernel_compile.py checks).

    Chosen from the compile-time report (bench/results/kernels.md): zero spills, and as many
    resident warps per SM as the registers allow. ``BLOCK_T * m2 >= 16`` keeps ``tl.dot``'s N
    dimension legal; ``BLOCK_K = 16`` is the smallest legal K. Below m = 256 (``m2 < 16``) the
    products are broadcast-and-sum on CUDA cores, one K-block.
    """
    return FusedConfig(**_FUSED_TABLE[m])


# Per m: the zero-spill point with the most resident warps found by sweeping BLOCK_T in {1, 2, 4}
# and 4/8/16 warps with ptxas -v for sm_90a and sm_100a, kept where Triton 3.3.1, 3.6 and 3.9 all
# compile it without spills (bench/results/kernels.md lists the result).
_FUSED_TABLE = {
    # m2 < 16: one K-block (BLOCK_K = m1), products as broadcast-and-sum on CUDA cores
    16: dict(BLOCK_T=4, BLOCK_K=4, UNROLL=1, num_warps=4),
    32: dict(BLOCK_T=2, BLOCK_K=8, UNROLL=1, num_warps=4),
    64: dict(BLOCK_T=2, BLOCK_K=8, UNROLL=1, num_warps=4),
    128: dict(BLOCK_T=2, BLOCK_K=16, UNROLL=1, num_warps=4),
    256: dict(BLOCK_T=4, BLOCK_K=16, UNROLL=1, num_warps=4),
    512: dict(BLOCK_T=1, BLOCK_K=16, UNROLL=1, num_warps=8),
    1024: dict(BLOCK_T=2, BLOCK_K=16, UNROLL=1, num_warps=4),
    2048: dict(BLOCK_T=1, BLOCK_K=16, UNROLL=1, num_warps=4),
    4096: dict(BLOCK_T=1, BLOCK_K=16, UNROLL=1, num_warps=8),  # as 128 x 32 (MAX_M2)
}


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def fused_unsupported(m: int, capability: tuple[int, int] | None = None) -> str | None:
    """Why the fused kernel cannot run for ``m`` on a GPU of ``capability`` with this Triton, or
    None if it can (``capability`` None: no device-specific limit applies, e.g. the interpreter)."""
    if m & (m - 1) or not FUSED_MIN_M <= m <= FUSED_MAX_M:
        return f"it needs m a power of two in [{FUSED_MIN_M}, {FUSED_MAX_M}], got m={m}"
    if capability is not None and capability[0] == 10 and m >= 4096 and _triton_version() < (3, 9):
        # Triton 3.6 gives each chained tl.dot its own tensor-memory accumulator and, past the
        # 512 columns of sm_100, emits a kernel that is one `trap` (bench/results/kernels.md).
        return (
            f"with Triton {triton.__version__} its sm_100 build at m={m} is not trusted: "
            "Triton 3.6 compiles it into a trap (tensor memory over-allocated), 3.9 does not"
        )
    return None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.cuda.get_device_capability(device)
    return None


def check_fused_m(m: int, device: torch.device) -> None:
    why = fused_unsupported(m, device_capability(device))
    if why is not None:
        raise ValueError(f"tensor_sketch_linear(path='fused'): {why}; use path='simple' (any m)")


def _bf16_split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ hi + lo`` with ``hi``, ``lo`` bf16-representable, stored as ``dtype``."""
    hi = x.to(torch.bfloat16)
    lo = (x - hi.to(x.dtype)).to(torch.bfloat16)
    return hi.to(dtype).contiguous(), lo.to(dtype).contiguous()


_DFT_CACHE: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, ...]] = {}


def dft_constants(m: int, device: torch.device, dot_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The four-step DFT factors, cached per ``(m, device, dot_dtype)``.

    Returns ``(f1, f2, tw)``: ``f1 (4, m1, m1)`` and ``f2 (4, m2, m2)`` in ``dot_dtype`` hold the
    hi/lo parts of ``Re F`` and ``Im F`` (in that order, hi then lo; below ``m2 = 16``, where no
    ``tl.dot`` runs, the fp32 factor and zeros);
    ``tw (2, m1, m2)`` fp32 holds ``Re``, ``Im`` of ``Tw[k1, n2] = w_m^(n2 k1)``. Angles are reduced
    exactly in integers mod the transform length before the float64 sin/cos.
    """
    key = (m, str(device), dot_dtype)
    if key not in _DFT_CACHE:
        m1, m2 = fused_factors(m)

        def unit_roots(rows: int, cols: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
            exponent = (torch.arange(rows)[:, None] * torch.arange(cols)[None, :]) % q
            angle = exponent.to(torch.float64) * (-2.0 * math.pi / q)
            return torch.cos(angle).to(torch.float32), torch.sin(angle).to(torch.float32)

        def split_parts(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
            if m2 < 16:  # no tl.dot: fp32 products on CUDA cores, the factor itself and lo = 0
                return torch.stack([re, re * 0, im, im * 0]).to(device).contiguous()
            parts = [p for x in (re, im) for p in _bf16_split(x, dot_dtype)]
            return torch.stack(parts).to(device).contiguous()

        tw = torch.stack(unit_roots(m1, m2, m)).to(device).contiguous()
        _DFT_CACHE[key] = (
            split_parts(*unit_roots(m1, m1, m1)),
            split_parts(*unit_roots(m2, m2, m2)),
            tw,
        )
    return _DFT_CACHE[key]


@triton.jit
def _split(x, DOT_DTYPE: tl.constexpr, USE_DOT: tl.constexpr):
    """``x ~ hi + lo``, both bf16-representable, as ``DOT_DTYPE`` (the operands of the passes);
    without ``tl.dot`` (fp32 CUDA cores) ``x`` itself and a zero ``lo``: nothing to lose."""
    if USE_DOT:
        hi = x.to(tl.bfloat16).to(tl.float32)
        lo = (x - hi).to(tl.bfloat16).to(tl.float32)
    else:
        hi = x
        lo = x * 0.0
    return hi.to(DOT_DTYPE), lo.to(DOT_DTYPE)


@triton.jit
def _mm3(x_hi, x_lo, y_hi, y_lo, acc, USE_DOT: tl.constexpr):
    """``acc + x @ y`` from the hi/lo parts: three tensor-core passes (the lo*lo term dropped);
    without ``tl.dot`` (a dimension < 16) one fp32 broadcast-and-sum (``lo`` is then 0)."""
    if USE_DOT:
        acc = tl.dot(x_hi, y_hi, acc, input_precision="ieee")
        acc = tl.dot(x_hi, y_lo, acc, input_precision="ieee")
        acc = tl.dot(x_lo, y_hi, acc, input_precision="ieee")
    else:
        x = x_hi.to(tl.float32) + x_lo.to(tl.float32)
        y = y_hi.to(tl.float32) + y_lo.to(tl.float32)
        acc += tl.sum(x[:, :, None] * y[None, :, :], axis=1)
    return acc


@triton.jit
def _load_parts(ptr, offs, SIZE: tl.constexpr):
    """The hi/lo parts of ``Re F`` and ``Im F`` stored by :func:`dft_constants`."""
    re_hi = tl.load(ptr + offs)
    re_lo = tl.load(ptr + SIZE + offs)
    im_hi = tl.load(ptr + 2 * SIZE + offs)
    im_lo = tl.load(ptr + 3 * SIZE + offs)
    return re_hi, re_lo, im_hi, im_lo


@triton.jit
def _fused_linear_kernel(
    a_ptr,  # (B, T, d_in) contiguous
    g_ptr,  # (B, T, d_out) contiguous
    codes_a_ptr,  # (width_a, m) int32 bucket lists of table.inp
    codes_g_ptr,  # (width_g, m) int32 bucket lists of table.out
    width_a,
    width_g,
    f1_ptr,  # (4, M1, M1) DOT_DTYPE: hi/lo of Re F1, Im F1
    f2_ptr,  # (4, M2, M2) DOT_DTYPE
    tw_ptr,  # (2, M1, M2) fp32: Re, Im of the twiddles
    part_ptr,  # (B, n_chunks, 2, M1, M2) fp32: S = sum_t Z_t^2 / alpha_t at k = k1 + M1 k2
    T,
    d_in,
    d_out,
    n_chunks,
    tokens_per_chunk,
    M1: tl.constexpr,
    M2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UNROLL: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    r1 = tl.arange(0, M1)
    r2 = tl.arange(0, M2)
    rk = tl.arange(0, BLOCK_K)
    rt = tl.arange(0, BLOCK_T)
    f2_offs = r2[:, None] * M2 + r2[None, :]
    tw_offs = r1[:, None, None] * M2 + r2[None, None, :]
    s_re = tl.zeros((M1, M2), dtype=tl.float32)
    s_im = tl.zeros((M1, M2), dtype=tl.float32)
    t_lo = chunk * tokens_per_chunk
    t_hi = tl.minimum(t_lo + tokens_per_chunk, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        tok = t0 + rt
        tok_ok = (tok < t_hi)[None, :, None]
        rows = (b * T + tok).to(tl.int64)[None, :, None]
        # Step 1 per K-block of n1: gather C_a, C_g rows n1 in the block (every input element is
        # read once), multiply by that K-slice of F1. The two sides are transformed separately
        # (P_a = F1 @ C_a, P_g = F1 @ C_g: the same four real products as one packed complex
        # one) so that alpha, known only after the last block, is applied afterwards.
        pa_re = tl.zeros((M1, BLOCK_T * M2), dtype=tl.float32)
        pa_im = tl.zeros((M1, BLOCK_T * M2), dtype=tl.float32)
        pg_re = tl.zeros((M1, BLOCK_T * M2), dtype=tl.float32)
        pg_im = tl.zeros((M1, BLOCK_T * M2), dtype=tl.float32)
        ss_a = tl.zeros((BLOCK_T,), dtype=tl.float32)
        ss_g = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in range(0, M1, BLOCK_K):
            n1 = k0 + rk
            bucket = n1[:, None, None] * M2 + r2[None, None, :]  # C[n1, t, n2] = c_t[M2 n1 + n2]
            zero = tl.zeros((BLOCK_K, BLOCK_T, M2), dtype=tl.float32)
            c_a = gather_bucket_sum(
                zero, a_ptr + rows * d_in, tok_ok, codes_a_ptr, bucket, M1 * M2, width_a, UNROLL
            )
            c_g = gather_bucket_sum(
                zero, g_ptr + rows * d_out, tok_ok, codes_g_ptr, bucket, M1 * M2, width_g, UNROLL
            )
            ss_a += tl.sum(tl.sum(c_a * c_a, axis=2), axis=0)
            ss_g += tl.sum(tl.sum(c_g * c_g, axis=2), axis=0)
            ca_hi, ca_lo = _split(tl.reshape(c_a, (BLOCK_K, BLOCK_T * M2)), DOT_DTYPE, USE_DOT)
            cg_hi, cg_lo = _split(tl.reshape(c_g, (BLOCK_K, BLOCK_T * M2)), DOT_DTYPE, USE_DOT)
            f1_offs = r1[:, None] * M1 + n1[None, :]
            fr_h, fr_l, fi_h, fi_l = _load_parts(f1_ptr, f1_offs, M1 * M1)
            pa_re = _mm3(fr_h, fr_l, ca_hi, ca_lo, pa_re, USE_DOT)
            pa_im = _mm3(fi_h, fi_l, ca_hi, ca_lo, pa_im, USE_DOT)
            pg_re = _mm3(fr_h, fr_l, cg_hi, cg_lo, pg_re, USE_DOT)
            pg_im = _mm3(fi_h, fi_l, cg_hi, cg_lo, pg_im, USE_DOT)
        # alpha = 2^trunc(log2(|c_a| / |c_g|)) per token: a power of two, exact to scale by.
        both = (ss_a > 0) & (ss_g > 0)
        log_ratio = 0.5 * (tl.log2(tl.where(both, ss_a, 1.0)) - tl.log2(tl.where(both, ss_g, 1.0)))
        log_ratio = tl.minimum(tl.maximum(log_ratio, -64.0), 64.0)
        alpha = tl.exp2(log_ratio.to(tl.int32).to(tl.float32))[None, :, None]
        # A token with an all-zero side (or past the chunk) contributes exactly nothing; skipping
        # it keeps the rounding noise of its unbalanced square out of S.
        inv_alpha = tl.where(both[None, :, None], 1.0 / alpha, 0.0)
        # P = P_a + i alpha P_g (the DFT of z = c_a + i alpha c_g), then Q = P * Tw
        pa_re = tl.reshape(pa_re, (M1, BLOCK_T, M2))
        pa_im = tl.reshape(pa_im, (M1, BLOCK_T, M2))
        pg_re = tl.reshape(pg_re, (M1, BLOCK_T, M2))
        pg_im = tl.reshape(pg_im, (M1, BLOCK_T, M2))
        p_re = pa_re - alpha * pg_im
        p_im = pa_im + alpha * pg_re
        tw_re = tl.load(tw_ptr + tw_offs)
        tw_im = tl.load(tw_ptr + M1 * M2 + tw_offs)
        q_re = tl.reshape(p_re * tw_re - p_im * tw_im, (M1 * BLOCK_T, M2))
        q_im = tl.reshape(p_re * tw_im + p_im * tw_re, (M1 * BLOCK_T, M2))
        q_re_hi, q_re_lo = _split(q_re, DOT_DTYPE, USE_DOT)
        q_im_hi, q_im_lo = _split(q_im, DOT_DTYPE, USE_DOT)
        # X = Q @ F2 (tokens stacked along M); the minus sign on an operand is exact
        fr_h, fr_l, fi_h, fi_l = _load_parts(f2_ptr, f2_offs, M2 * M2)
        x_re = tl.zeros((M1 * BLOCK_T, M2), dtype=tl.float32)
        x_re = _mm3(q_re_hi, q_re_lo, fr_h, fr_l, x_re, USE_DOT)
        x_re = _mm3(-q_im_hi, -q_im_lo, fi_h, fi_l, x_re, USE_DOT)
        x_im = tl.zeros((M1 * BLOCK_T, M2), dtype=tl.float32)
        x_im = _mm3(q_re_hi, q_re_lo, fi_h, fi_l, x_im, USE_DOT)
        x_im = _mm3(q_im_hi, q_im_lo, fr_h, fr_l, x_im, USE_DOT)
        x_re = tl.reshape(x_re, (M1, BLOCK_T, M2))
        x_im = tl.reshape(x_im, (M1, BLOCK_T, M2))
        s_re += tl.sum((x_re * x_re - x_im * x_im) * inv_alpha, axis=1)
        s_im += tl.sum(2.0 * x_re * x_im * inv_alpha, axis=1)
    s_offs = r1[:, None] * M2 + r2[None, :]
    dst = part_ptr + (b * n_chunks + chunk).to(tl.int64) * (2 * M1 * M2) + s_offs
    tl.store(dst, s_re)
    tl.store(dst + M1 * M2, s_im)


def dot_dtype(device: torch.device) -> torch.dtype:
    """bf16 operands on a GPU; fp32 holding the same bf16 values in the interpreter (no bf16 dot)."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.bfloat16
    return torch.float32


def linear_fused(
    a: torch.Tensor, g: torch.Tensor, table: TensorSketchHash, out: torch.Tensor
) -> torch.Tensor:
    """TensorSketch of ``G_b^T A_b`` into ``out (B, m)`` fp32; a, g contiguous, checked, T > 0."""
    m = table.m
    check_fused_m(m, a.device)
    n_b, n_t, d_in = a.shape
    d_out = g.shape[-1]
    m1, m2 = fused_factors(m)
    cfg = fused_config(m)
    operand = dot_dtype(a.device) if m2 >= 16 else torch.float32
    f1, f2, tw = dft_constants(m, a.device, operand)
    codes_a, width_a = bucket_codes(table.inp)
    codes_g, width_g = bucket_codes(table.out)
    n_chunks, per_chunk = token_splits(n_t, n_b, a.device, multiple=cfg.BLOCK_T)
    part = torch.empty(n_b, n_chunks, 2, m1, m2, dtype=torch.float32, device=a.device)
    _fused_linear_kernel[(n_b, n_chunks)](
        a,
        g,
        codes_a,
        codes_g,
        width_a,
        width_g,
        f1,
        f2,
        tw,
        part,
        n_t,
        d_in,
        d_out,
        n_chunks,
        per_chunk,
        M1=m1,
        M2=m2,
        BLOCK_T=cfg.BLOCK_T,
        BLOCK_K=cfg.BLOCK_K,
        USE_DOT=m2 >= 16,
        DOT_DTYPE=tl.bfloat16 if operand == torch.bfloat16 else tl.float32,
        UNROLL=cfg.UNROLL,
        num_warps=cfg.num_warps,
    )
    # (B, 2, m1, m2) at k = k1 + m1 k2 -> spectrum order k
    s = part.sum(dim=1).transpose(-1, -2).reshape(n_b, 2, m)
    s = torch.complex(s[:, 0], s[:, 1])
    neg_k = (-torch.arange(m // 2 + 1, device=a.device)) % m
    spec = (s[:, : m // 2 + 1] - s[:, neg_k].conj()) * -0.25j  # (S[k] - conj(S[-k])) / 4i
    return torch.fft.irfft(spec, n=m, dim=-1, out=out)
