"""Triton TensorSketch of per-example Linear and Embedding weight gradients.

For one use of an ``nn.Linear`` with activations ``a (B, T, d_in)`` and grad-outputs
``g (B, T, d_out)``, the per-example gradient is ``phi_b = G_b^T A_b (d_out, d_in)``, sketched as::

    TS(phi_b) = irfft( sum_t rfft(CS_out(g[b, t])) * rfft(CS_in(a[b, t])) )        (B, m) fp32

computed without ever forming ``phi_b``. Two paths, selected by ``path=``:

``"simple"``
    Triton CountSketch of both sides (:mod:`sdi.kernels.count_sketch`), ``torch.fft.rfft`` (cuFFT),
    one Triton kernel that multiplies the two spectra and sums them over tokens without writing the
    per-token products, ``torch.fft.irfft``. Any ``m >= 1``.

``"fused"``
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
    of two with ``16 <= m <= 4096`` (the DFT matrices and one token's spectrum live in registers).

Four-step DFT (``m = m1*m2``, ``n = m2*n1 + n2``, ``k = k1 + m1*k2``, ``w_q = exp(-2 pi i / q)``)::

    X[k1 + m1 k2] = sum_n2 w_m2^(n2 k2) * w_m^(n2 k1) * sum_n1 w_m1^(n1 k1) * c[m2 n1 + n2]

i.e. with ``C[n2, n1] = c[m2 n1 + n2]``: ``P = C @ F1``, ``Q = P * Tw``, ``X = F2 @ Q``, where
``F1 (m1, m1)``, ``F2 (m2, m2)`` and ``Tw[n2, k1] = w_m^(n2 k1)`` are cached per ``(m, device)``,
and ``X[k2, k1]`` is the spectrum at ``k = k1 + m1 k2``: row-major order, no transposes.

Embedding: ``phi_b = sum_t onehot(id_t) (x) g_t``; the one-hot side sketches to one signed spike, so
``TS(phi_b)[k] = sum_t s_out(id_t) * CS_in(g_t)[(k - h_out(id_t)) mod m]``: a signed circular
shift-add, fused with the CountSketch gather in one kernel, no FFT.

All entry points take fp32 / fp16 / bf16 inputs, accumulate in fp32, return fp32, and agree with
:mod:`sdi.kernels.torch_ops` to float rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..sketch import CountSketchHash, TensorSketchHash
from .count_sketch import (
    GATHER_UNROLL,
    bucket_codes,
    check_out,
    check_table,
    count_sketch_rows,
    table_cache,
)

# Default path. "simple" is the default because it is the robust one: cuFFT and two memory-bound
# kernels, correct for every m, and the fused kernel's per-token register-resident DFT has not yet
# been timed on a GPU (bench/gpu.py measures both; switch the default if "fused" wins there).
DEFAULT_PATH = "simple"
PATHS = ("simple", "fused")

FUSED_MIN_M = 16
FUSED_MAX_M = 4096

# Precision of the fused path's fp32 DFT products on tensor cores: three TF32 passes give about
# fp32 accuracy (plain "tf32" would cost ~1e-3 relative error for a third of the tensor-core work).
_DFT_PRECISION = "tf32x3"


# --------------------------------------------------------------------------------------------
# shared host-side helpers


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About how many programs keep the device busy: a few per SM on CUDA, a handful elsewhere
    (the interpreter runs programs one by one; 8 still exercises the token split in tests)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _token_splits(n_tokens: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """Split ``n_tokens`` into chunks so that ``other_programs * chunks`` fills the device.

    Returns ``(n_chunks, tokens_per_chunk)``, every chunk non-empty.
    """
    want = max(1, -(-_programs_wanted(device) // max(other_programs, 1)))
    per_chunk = -(-n_tokens // min(want, n_tokens))
    return -(-n_tokens // per_chunk), per_chunk


def _check_tables(table: TensorSketchHash) -> None:
    if table.out.m != table.inp.m:
        raise ValueError(
            f"TensorSketch tables disagree on m: out has {table.out.m}, inp has {table.inp.m}"
        )


def _buckets_int32(table: CountSketchHash) -> torch.Tensor:
    """``table.h`` as int32 on its device, cached per table."""
    entry = table_cache(table)
    if "h32" not in entry:
        entry["h32"] = table.h.to(torch.int32, copy=True)  # never `h` itself: it keys the cache
    return entry["h32"]


def _sum_chunks(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = part.sum(0)``; a single chunk was written straight into ``out``."""
    if part.data_ptr() != out.data_ptr():
        torch.sum(part, dim=0, out=out)
    return out


# --------------------------------------------------------------------------------------------
# simple path: CountSketch -> rfft -> spectrum product summed over tokens -> irfft


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
    block_f = min(256, triton.next_power_of_2(n_f))
    n_fblocks = triton.cdiv(n_f, block_f)
    n_chunks, per_chunk = _token_splits(n_t, n_b * n_fblocks, spec_a.device)
    part = out.unsqueeze(0) if n_chunks == 1 else spec_a.new_empty(n_chunks, n_b, n_f, 2)
    _spectrum_dot_kernel[(n_b, n_fblocks, n_chunks)](
        spec_a, spec_g, part, n_b, n_t, n_f, per_chunk, BLOCK_F=block_f
    )
    return _sum_chunks(part, out)


def _linear_simple(
    a: torch.Tensor, g: torch.Tensor, table: TensorSketchHash, out: torch.Tensor
) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# fused path: on-chip CountSketch + four-step DFT of both sides, spectra product summed over tokens

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
def _gather_sketch(
    row_ptr, codes_ptr, width, offs, M1: tl.constexpr, M2: tl.constexpr, UNROLL: tl.constexpr
):
    """CountSketch of one input row into the ``(M2, M1)`` four-step layout (see ``offs``)."""
    acc = tl.zeros((M2, M1), dtype=tl.float32)
    for slot0 in range(0, width, UNROLL):
        for u in tl.static_range(UNROLL):
            slot = slot0 + u
            n_live = tl.where(slot < width, M1 * M2, 0)  # slots past the list load nothing
            code = tl.load(codes_ptr + slot * (M1 * M2) + offs, mask=offs < n_live, other=0)
            v = tl.load(row_ptr + (tl.abs(code) - 1), mask=code != 0, other=0.0).to(tl.float32)
            acc += tl.where(code > 0, v, -v)
    return acc


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
        c_a = _gather_sketch(a_ptr + row * d_in, codes_a_ptr, width_a, offs, M1, M2, UNROLL)
        c_g = _gather_sketch(g_ptr + row * d_out, codes_g_ptr, width_g, offs, M1, M2, UNROLL)
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


def _linear_fused(
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
    n_chunks, per_chunk = _token_splits(n_t, n_b, a.device)
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


# --------------------------------------------------------------------------------------------
# public entry points


def tensor_sketch_linear(
    a: torch.Tensor,
    g: torch.Tensor,
    table: TensorSketchHash,
    *,
    path: str = DEFAULT_PATH,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """TensorSketch of per-example Linear weight gradients ``G_b^T A_b``, never materialised.

    a: ``(B, T, d_in)`` activations; g: ``(B, T, d_out)`` grad-outputs (fp32/fp16/bf16, same
    device as ``table``). Returns ``(B, m)`` fp32,
    ``irfft(sum_T rfft(CS_out(g)) * rfft(CS_in(a)))``, as
    :func:`sdi.kernels.torch_ops.tensor_sketch_linear`. ``path``: ``"simple"`` (any m) or
    ``"fused"`` (m a power of two in [16, 4096]); see the module docstring. ``out``, if given, is a
    contiguous fp32 ``(B, m)`` tensor that receives the result.
    """
    if path not in PATHS:
        raise ValueError(f"tensor_sketch_linear: path must be one of {PATHS}, got {path!r}")
    _check_tables(table)
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"tensor_sketch_linear: need a (B, T, d_in) and g (B, T, d_out) with equal B, T; "
            f"got a {tuple(a.shape)}, g {tuple(g.shape)}"
        )
    if a.device != g.device:
        raise ValueError(f"tensor_sketch_linear: a is on {a.device} but g is on {g.device}")
    check_table("tensor_sketch_linear (a vs table.inp)", a, table.inp)
    check_table("tensor_sketch_linear (g vs table.out)", g, table.out)
    n_b, n_t, _ = a.shape
    out = check_out("tensor_sketch_linear", out, (n_b, table.m), a.device)
    if n_b == 0 or n_t == 0:
        return out.zero_()
    a, g = a.contiguous(), g.contiguous()
    if path == "simple":
        return _linear_simple(a, g, table, out)
    return _linear_fused(a, g, table, out)


@triton.jit
def _embedding_kernel(
    ids_ptr,  # (B, T) integer token ids
    g_ptr,  # (B, T, d) contiguous grad-outputs
    codes_ptr,  # (width, m) int32 bucket lists of the inp table (over d)
    h_out_ptr,  # (V,) int32 buckets of the out table (over the vocabulary)
    s_out_ptr,  # (V,) fp32 signs of the out table
    part_ptr,  # (n_chunks, B, m) fp32
    B,
    T,
    d,
    m,
    V,
    width,
    tokens_per_chunk,
    BLOCK_M: tl.constexpr,
    UNROLL: tl.constexpr,
):
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(2)
    k_ok = k < m
    t_lo = chunk * tokens_per_chunk
    t_hi = tl.minimum(t_lo + tokens_per_chunk, T)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        row = (b * T + t).to(tl.int64)
        token = tl.load(ids_ptr + row)
        # An id outside [0, V) contributes nothing (and reads nothing out of bounds) when the
        # caller skipped the range check.
        valid = (token >= 0) & (token < V)
        shift = tl.load(h_out_ptr + token, mask=valid, other=0)
        sign = tl.load(s_out_ptr + token, mask=valid, other=0.0)
        # out[k] += sign * CS(g_t)[(k - shift) mod m]: gather the source bucket's members.
        src = k - shift
        src = tl.where(src < 0, src + m, src)
        g_row = g_ptr + row * d
        cs = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for slot0 in range(0, width, UNROLL):
            for u in tl.static_range(UNROLL):
                slot = slot0 + u
                n_live = tl.where(slot < width, m, 0)  # slots past the list load nothing
                code = tl.load(codes_ptr + slot * m + src, mask=k < n_live, other=0)
                v = tl.load(g_row + (tl.abs(code) - 1), mask=code != 0, other=0.0)
                v = v.to(tl.float32)
                cs += tl.where(code > 0, v, -v)
        acc += sign * cs
    tl.store(part_ptr + (chunk * B + b).to(tl.int64) * m + k, acc, mask=k_ok)


def tensor_sketch_embedding(
    ids: torch.Tensor,
    g: torch.Tensor,
    table: TensorSketchHash,
    *,
    out: torch.Tensor | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """TensorSketch of per-example Embedding weight gradients ``sum_t onehot(id_t) (x) g_t``.

    ids: ``(B, T)`` integer token ids in ``[0, V)`` with ``V = table.out.d``; g: ``(B, T, d)``
    grad-outputs (fp32/fp16/bf16) with ``d = table.inp.d``. Returns ``(B, m)`` fp32:
    ``out[b, k] = sum_t s_out(id) * CS_in(g[b, t])[(k - h_out(id)) mod m]``, as
    :func:`sdi.kernels.torch_ops.tensor_sketch_embedding`. One kernel, no FFT, no atomics.
    Checking the id range costs one device sync; ``check_ids=False`` skips it (the estimator does:
    its ids already passed ``nn.Embedding``'s forward), and out-of-range ids then contribute zero.
    """
    _check_tables(table)
    if ids.dim() != 2 or g.dim() != 3 or ids.shape != g.shape[:2]:
        raise ValueError(
            "tensor_sketch_embedding: need ids (B, T) and g (B, T, d); "
            f"got ids {tuple(ids.shape)}, g {tuple(g.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"tensor_sketch_embedding: ids must be an integer tensor, got {ids.dtype}")
    if ids.device != g.device:
        raise ValueError(f"tensor_sketch_embedding: ids are on {ids.device} but g is on {g.device}")
    check_table("tensor_sketch_embedding (g vs table.inp)", g, table.inp)
    if table.out.h.device != g.device:
        raise ValueError(
            f"tensor_sketch_embedding: g is on {g.device} but table.out is on "
            f"{table.out.h.device}; move the table with table.to(device)"
        )
    n_b, n_t, d = g.shape
    m = table.m
    out = check_out("tensor_sketch_embedding", out, (n_b, m), g.device)
    if n_b == 0 or n_t == 0:
        return out.zero_()
    if check_ids:
        lo, hi = (int(v) for v in ids.aminmax())
        if lo < 0 or hi >= table.out.d:
            raise ValueError(
                f"tensor_sketch_embedding: ids span [{lo}, {hi}], outside [0, {table.out.d})"
            )
    ids, g = ids.contiguous(), g.contiguous()
    codes, width = bucket_codes(table.inp)
    h_out = _buckets_int32(table.out)
    block_m = min(256, triton.next_power_of_2(m))
    n_mblocks = triton.cdiv(m, block_m)
    n_chunks, per_chunk = _token_splits(n_t, n_b * n_mblocks, g.device)
    part = out.unsqueeze(0) if n_chunks == 1 else out.new_empty(n_chunks, n_b, m)
    _embedding_kernel[(n_b, n_mblocks, n_chunks)](
        ids,
        g,
        codes,
        h_out,
        table.out.s,
        part,
        n_b,
        n_t,
        d,
        m,
        table.out.d,
        width,
        per_chunk,
        BLOCK_M=block_m,
        UNROLL=GATHER_UNROLL,
    )
    return _sum_chunks(part, out)
