"""Triton CountSketch of the last dimension: ``x (..., d)`` -> ``(..., m)`` fp32.

Math (see :mod:`sdi.sketch`): with a bucket ``h: [d] -> [m]`` and a sign ``s: [d] -> {-1, +1}``::

    CS(x)[n, k] = sum_{j : h(j) = k} s(j) * x[n, j]

Scheme: a *gather*, not a scatter. The hash is turned once per table into a padded bucket list
``codes (L, m)`` int32 (see :func:`bucket_codes`): column ``k`` lists the members ``j`` of bucket
``k`` as signed codes ``s(j) * (j + 1)``, zero-padded to the largest bucket size ``L``. Each program
then owns a ``(BLOCK_N, BLOCK_M)`` output tile and sums ``L`` gathered, signed inputs into it,
``GATHER_UNROLL`` slots per loop step.

Why a gather: every output element is written exactly once, so there is no zero-fill pass, no
atomics (the result is bitwise deterministic), and the output stores are coalesced. The scattered
reads stay inside the tile's ``BLOCK_N`` input rows, which the cache holds while the tile's buckets
are read. The cost is the padding: ``m * L`` gather slots for ``d`` inputs, about ``1.4 d`` when
``d >> m`` and a few times ``m`` when ``d << m`` (masked slots issue no memory traffic).

The helpers here (table packing, input checks) are shared with :mod:`sdi.kernels.tensor_sketch`.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ..sketch import CountSketchHash

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bucket-list slots gathered per loop step: that many independent code -> value load chains are in
# flight at once (a gather waits on memory twice in a row; one chain at a time stalls on latency).
GATHER_UNROLL = 4

# Per hash table: the packed device tensors derived from it, keyed on ``id(table.h)`` and dropped
# when that tensor dies (a WeakKeyDictionary would compare tensors with ``==`` on hash collisions).
_PACKED: dict[int, dict] = {}


def table_cache(table: CountSketchHash) -> dict:
    """The per-table dict of packed device tensors (created empty on first use)."""
    key = id(table.h)
    entry = _PACKED.get(key)
    if entry is None:
        entry = _PACKED[key] = {}
        weakref.finalize(table.h, _PACKED.pop, key, None)
    return entry


def bucket_codes(table: CountSketchHash) -> tuple[torch.Tensor, int]:
    """The padded bucket lists of ``table``: ``(codes, L)``, cached per table.

    ``codes`` is int32 of shape ``(L, m)`` on the table's device. For bucket ``k`` its column holds
    ``s(j) * (j + 1)`` for every ``j`` with ``h(j) = k`` (in increasing ``j``), then zeros; ``L`` is
    the largest bucket size (at least 1). Requires ``s`` in ``{-1, +1}`` (what the tables draw).
    """
    entry = table_cache(table)
    if "codes" not in entry:
        h, s, m = table.h, table.s, table.m
        if h.numel() >= 2**31 - 1:
            raise ValueError(f"sketched dimension d={h.numel()} is too large for int32 codes")
        if not bool((s.abs() == 1).all()):
            raise ValueError("CountSketch signs must all be +1 or -1")
        order = torch.argsort(h, stable=True)
        bucket = h[order]
        counts = torch.bincount(h, minlength=m)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(h.numel(), device=h.device) - starts[bucket]
        width = max(int(counts.max()), 1)
        code = (order + 1).to(torch.int32) * s[order].to(torch.int32)
        codes = torch.zeros(width, m, dtype=torch.int32, device=h.device)
        codes[slot, bucket] = code
        entry["codes"] = (codes, width)
    return entry["codes"]


def check_table(name: str, x: torch.Tensor, table: CountSketchHash) -> None:
    """Clear errors for a sketch input ``x (..., d)`` that does not fit ``table``."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: dtype {x.dtype} is not supported (use float32, float16 or bfloat16)"
        )
    if x.dim() == 0 or x.shape[-1] != table.d:
        raise ValueError(
            f"{name}: last dimension of shape {tuple(x.shape)} != table size {table.d}"
        )
    if table.h.device != x.device or table.s.device != x.device:
        raise ValueError(
            f"{name}: input is on {x.device} but its hash table is on {table.h.device}; "
            "move the table with table.to(device)"
        )


def check_out(
    name: str, out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Return ``out`` after checking it, or a fresh fp32 tensor of ``shape`` on ``device``."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(
            f"{name}: out must be float32 of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name}: out must be contiguous")
    return out


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
    col_ok = cols < m
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for slot0 in range(0, L, UNROLL):
        for u in tl.static_range(UNROLL):
            slot = slot0 + u
            # Slots past the list load nothing. (A bucket limit rather than `col_ok & (slot < L)`:
            # the interpreter mis-types a tensor-and-scalar boolean `&`.)
            n_live = tl.where(slot < L, m, 0)
            code = tl.load(codes_ptr + slot * m + cols, mask=cols < n_live, other=0)
            j = tl.abs(code) - 1
            v = tl.load(x_rows + j[None, :], mask=row_ok[:, None] & (code != 0)[None, :], other=0.0)
            v = v.to(tl.float32)
            acc += tl.where((code > 0)[None, :], v, -v)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def count_sketch_rows(x: torch.Tensor, table: CountSketchHash, out: torch.Tensor) -> torch.Tensor:
    """Launch the CountSketch of the rows of ``x (N, d)`` (unit stride along ``d``) into
    ``out (N, m)`` fp32 (unit stride along ``m``). No checks: callers validate."""
    n_rows, m = x.shape[0], table.m
    if n_rows == 0:
        return out
    codes, width = bucket_codes(table)
    block_m = min(128, triton.next_power_of_2(m))
    block_n = min(16, triton.next_power_of_2(n_rows))
    grid = (triton.cdiv(n_rows, block_n) * triton.cdiv(m, block_m),)
    _count_sketch_kernel[grid](
        x,
        codes,
        out,
        n_rows,
        m,
        width,
        x.stride(0),
        out.stride(0),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        UNROLL=GATHER_UNROLL,
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
