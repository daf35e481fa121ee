"""Helpers shared by the Triton kernels: the bucket-gather ``@triton.jit`` loop, per-table packed
tensors, input checks and the split of a token axis between programs.

Bucket lists (the CountSketch *gather*): the hash of a table is turned once into a padded bucket
list ``codes (L, m)`` int32 (:func:`bucket_codes`): column ``k`` lists the members ``j`` of bucket
``k`` as signed codes ``s(j) * (j + 1)``, zero-padded to the largest bucket size ``L``. A kernel
sums the ``L`` gathered, signed inputs of each bucket it owns (:func:`gather_bucket_sum`): every
output is written once, no atomics (bitwise deterministic), no zero-fill pass. The cost is the
padding: ``m * L`` slots for ``d`` inputs, about ``1.4 d`` when ``d >> m`` (masked slots issue no
memory traffic).
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl

from ..sketch import CountSketchHash, TensorSketchHash

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bucket-list slots gathered per loop step: that many independent code -> value load chains are in
# flight at once (a gather waits on memory twice in a row; one chain at a time stalls on latency).
GATHER_UNROLL = 4


@triton.jit
def gather_bucket_sum(acc, x_base, x_ok, codes_ptr, bucket, m, width, UNROLL: tl.constexpr):
    """``acc + CS(x)[bucket]``: the signed sum of the members of each bucket, gathered.

    ``codes_ptr``: the ``(width, m)`` int32 bucket lists of :func:`bucket_codes` (or the same lists
    with their ``m`` columns permuted). ``bucket``: int tensor of bucket (column) indices; one
    ``>= m`` gathers nothing. ``x_base``: pointer(s) to the input rows (element ``j`` of a row is
    at ``x_base + j``); ``x_ok``: boolean tensor, False for rows to skip. ``bucket``, ``x_base``
    and ``x_ok`` broadcast together to the shape of ``acc`` (fp32).
    """
    for slot0 in range(0, width, UNROLL):
        for u in tl.static_range(UNROLL):
            slot = slot0 + u
            # Slots past the list load nothing. (A bucket limit rather than `ok & (slot < L)`:
            # the interpreter mis-types a tensor-and-scalar boolean `&`.)
            n_live = tl.where(slot < width, m, 0)
            code = tl.load(codes_ptr + slot * m + bucket, mask=bucket < n_live, other=0)
            v = tl.load(x_base + (tl.abs(code) - 1), mask=x_ok & (code != 0), other=0.0)
            v = v.to(tl.float32)
            acc += tl.where(code > 0, v, -v)
    return acc


# --------------------------------------------------------------------------------------------
# per-table packed tensors

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


def buckets_int32(table: CountSketchHash) -> torch.Tensor:
    """``table.h`` as int32 on its device, cached per table."""
    entry = table_cache(table)
    if "h32" not in entry:
        entry["h32"] = table.h.to(torch.int32, copy=True)  # never `h` itself: it keys the cache
    return entry["h32"]


# --------------------------------------------------------------------------------------------
# input checks


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


def check_tensor_tables(table: TensorSketchHash) -> None:
    """The two CountSketch tables of a TensorSketch must share ``m``."""
    if table.out.m != table.inp.m:
        raise ValueError(
            f"TensorSketch tables disagree on m: out has {table.out.m}, inp has {table.inp.m}"
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


# --------------------------------------------------------------------------------------------
# splitting the token axis between programs


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About how many programs keep the device busy: a few per SM on CUDA, a handful elsewhere
    (the interpreter runs programs one by one; 8 still exercises the token split in tests)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def token_splits(
    n_tokens: int, other_programs: int, device: torch.device, multiple: int = 1
) -> tuple[int, int]:
    """Split ``n_tokens`` into chunks so that ``other_programs * chunks`` fills the device.

    Returns ``(n_chunks, tokens_per_chunk)``, every chunk non-empty; ``tokens_per_chunk`` is a
    multiple of ``multiple`` (a kernel's token block) unless one chunk holds every token.
    """
    want = max(1, -(-_programs_wanted(device) // max(other_programs, 1)))
    per_chunk = -(-n_tokens // min(want, n_tokens))
    per_chunk = min(-(-per_chunk // multiple) * multiple, n_tokens)
    return -(-n_tokens // per_chunk), per_chunk


def sum_chunks(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = part.sum(0)``; a single chunk was written straight into ``out``."""
    if part.data_ptr() != out.data_ptr():
        torch.sum(part, dim=0, out=out)
    return out
