"""Triton CountSketch of the last dimension: ``x (..., d)`` -> ``(..., m)`` fp32.

Math (see :mod:`sdi.sketch`): with a bucket ``h: [d] -> [m]`` and a sign ``s: [d] -> {-1, +1}``::

    CS(x)[n, k] = sum_{j : h(j) = k} s(j) * x[n, j]

Each program owns a ``(BLOCK_N, BLOCK_M)`` output tile and gathers its buckets' members through
the padded bucket lists (:func:`sdi.kernels.utils.gather_bucket_sum`). The scattered reads stay
inside the tile's ``BLOCK_N`` input rows, which the cache holds while the tile's buckets are read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..sketch import CountSketchHash
from .utils import GATHER_UNROLL, bucket_codes, check_out, check_table, gather_bucket_sum


class CountSketchConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_M: int
    num_warps: int


def count_sketch_config(n_rows: int, m: int) -> CountSketchConfig:
    """The launch configuration :func:`count_sketch_rows` uses (also what bench/gpu/kernel_report.py
    compiles): 16 rows x 128 buckets per program, smaller when there are fewer."""
    return CountSketchConfig(
        BLOCK_N=min(16, triton.next_power_of_2(max(n_rows, 1))),
        BLOCK_M=min(128, triton.next_power_of_2(m)),
        num_warps=4,
    )


@triton.jit
def _count_sketch_kernel(
    x_ptr,  # (N, d) rows, unit stride along d
    codes_ptr,  # (L, m) int32 signed bucket lists
    out_ptr,  # (N, m) fp32
    N,
    m,
    L,
    stride_x,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UNROLL: tl.constexpr,
):
    # Bucket blocks vary fastest, so programs running together share their input rows in cache.
    n_mblocks = tl.cdiv(m, BLOCK_M)
    pid = tl.program_id(0)
    rows = (pid // n_mblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = gather_bucket_sum(acc, x_rows, row_ok[:, None], codes_ptr, cols[None, :], m, L, UNROLL)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (cols < m)[None, :])


def count_sketch_rows(x: torch.Tensor, table: CountSketchHash, out: torch.Tensor) -> torch.Tensor:
    """Launch the CountSketch of the rows of ``x (N, d)`` (unit stride along ``d``) into
    ``out (N, m)`` fp32 (unit stride along ``m``). No checks: callers validate."""
    n_rows, m = x.shape[0], table.m
    if n_rows == 0:
        return out
    codes, width = bucket_codes(table)
    cfg = count_sketch_config(n_rows, m)
    grid = (triton.cdiv(n_rows, cfg.BLOCK_N) * triton.cdiv(m, cfg.BLOCK_M),)
    _count_sketch_kernel[grid](
        x,
        codes,
        out,
        n_rows,
        m,
        width,
        x.stride(0),
        out.stride(0),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_M=cfg.BLOCK_M,
        UNROLL=GATHER_UNROLL,
        num_warps=cfg.num_warps,
    )
    return out


def count_sketch(
    x: torch.Tensor, table: CountSketchHash, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """CountSketch of the last dimension: ``x (..., d)`` fp32/fp16/bf16 -> ``(..., m)`` fp32.

    Same semantics as :func:`sdi.kernels.torch_ops.count_sketch`; a 1-D ``x (d,)`` gives ``(m,)``.
    ``out``, if given, must be a contiguous fp32 tensor of the result's shape; it is overwritten.
    """
    check_table("count_sketch", x, table)
    shape = (*x.shape[:-1], table.m)
    out = check_out("count_sketch", out, shape, x.device)
    rows = x.reshape(-1, table.d)
    if rows.shape[0] > 0 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    count_sketch_rows(rows, table, out.view(-1, table.m))
    return out
