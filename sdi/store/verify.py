"""The checks of every read: a block's catalogue entry, its size and the checksum of its bytes.

The checksum is XXH3-128 (``xxhash``), seeded with the batch's index so that the block of another
batch, copied or pointed to, does not match either. At ~14 GB/s it adds little to copying the
bytes out of the page cache (SHA-256: ~1.5 GB/s here, CRC-32: ~2 GB/s, which would have made a
verified read 3-4x slower than an unverified one): ``bench/results/store_scale.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import xxhash

from .catalogue import BatchEntry
from .errors import CorruptShardError

CHECKSUM = "xxh3_128"


def checksum(data, index: int) -> str:
    """XXH3-128 (hex) of ``data`` (a bytes-like object) seeded with batch ``index``."""
    return xxhash.xxh3_128_hexdigest(data, seed=index)


def check_entry(root: Path, entry: BatchEntry) -> None:
    """Raise :class:`CorruptShardError` if ``entry`` contradicts itself (rows, shape, size, dtype)."""

    def bad(what: str) -> CorruptShardError:
        return CorruptShardError(root, entry.file, what, entry.index)

    if entry.dtype != "<f4":
        raise bad(f"has dtype {entry.dtype!r} in the catalogue, not float32 ('<f4')")
    if entry.shape[0] != entry.rows:
        raise bad(f"holds shape {entry.shape}, but the catalogue says {entry.rows} rows")
    size = math.prod(entry.shape) * 4
    if size != entry.nbytes:
        raise bad(
            f"of shape {entry.shape} float32 is {size} bytes, the catalogue says {entry.nbytes}"
        )


def as_features(root: Path, entry: BatchEntry, data: np.ndarray) -> torch.Tensor:
    """``data`` (the block's bytes, ``uint8``) as a float32 tensor of ``entry.shape``, after
    checking its checksum; raises :class:`CorruptShardError` naming the block otherwise."""
    if checksum(data, entry.index) != entry.checksum:
        raise CorruptShardError(
            root,
            entry.file,
            f"at byte {entry.offset} does not match its checksum ({CHECKSUM}) in the catalogue: "
            "its bytes changed after writing",
            entry.index,
        )
    return torch.from_numpy(data.view(np.float32).reshape(entry.shape))
