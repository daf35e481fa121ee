"""A writer process for tests/test_store_crash.py: appends deterministic batches to a store.

Started with ``multiprocessing``'s fork context (no second import of torch: the tests start many).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdi.store import FeatureStore

IDENTITY = {"kind": "crash-test"}
FILE_BYTES = 300_000  # a roll-over every ~10 batches: kills also land around roll-overs


def crash_features(i: int) -> torch.Tensor:
    """Batch ``i``'s features: 1 to 7 rows of 2048 floats (8 to 57 KiB), a pure function of ``i``."""
    return torch.randn(1 + i % 7, 2048, generator=torch.Generator().manual_seed(i))


def write(root: Path, last: int, ready, go=None) -> None:
    """Open the store, set ``ready``, wait for ``go`` (if given), append batches ``stored .. last - 1``
    (``crash_features(i)``, fingerprint ``fp<i>``; a batch another writer stored meanwhile is
    adopted), then mark the store complete with ``last`` batches."""
    torch.set_num_threads(1)
    with FeatureStore(root, IDENTITY, file_bytes=FILE_BYTES) as store:
        ready.set()
        if go is not None:
            go.wait(60)
        while store.stored < last:
            i = store.stored
            store.append(crash_features(i), steps=1 + i % 3, fingerprint=f"fp{i}")
        store.finish(last)
