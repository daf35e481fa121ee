"""Triton TensorSketch of per-example Embedding weight gradients ``sum_t onehot(id_t) (x) g_t``.

The one-hot side sketches to one signed spike, so::

    TS(phi_b)[k] = sum_t s_out(id_t) * CS_in(g_t)[(k - h_out(id_t)) mod m]

a signed circular shift-add, fused with the CountSketch gather in one kernel: no FFT, no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..sketch import TensorSketchHash
from .utils import (
    GATHER_UNROLL,
    bucket_codes,
    buckets_int32,
    check_out,
    check_table,
    check_tensor_tables,
    gather_bucket_sum,
    sum_chunks,
    token_splits,
)


class EmbeddingConfig(NamedTuple):
    BLOCK_M: int
    num_warps: int


def embedding_config(m: int) -> EmbeddingConfig:
    """The launch configuration :func:`tensor_sketch_embedding` uses (also what
    bench/gpu/kernel_report.py compiles): 256 buckets per program, fewer when ``m`` is smaller."""
    return EmbeddingConfig(BLOCK_M=min(256, triton.next_power_of_2(m)), num_warps=4)


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
        # out[k] += sign * CS(g_t)[(k - shift) mod m]: gather the source bucket's members
        # (bucket m, past the lists, for the masked tail of the block).
        src = k - shift
        src = tl.where(src < 0, src + m, src)
        src = tl.where(k_ok, src, m)
        cs = tl.zeros((BLOCK_M,), dtype=tl.float32)
        cs = gather_bucket_sum(cs, g_ptr + row * d, k_ok, codes_ptr, src, m, width, UNROLL)
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
    check_tensor_tables(table)
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
    h_out = buckets_int32(table.out)
    cfg = embedding_config(m)
    n_mblocks = triton.cdiv(m, cfg.BLOCK_M)
    n_chunks, per_chunk = token_splits(n_t, n_b * n_mblocks, g.device)
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
        BLOCK_M=cfg.BLOCK_M,
        UNROLL=GATHER_UNROLL,
        num_warps=cfg.num_warps,
    )
    return sum_chunks(part, out)
