"""Opening one checkpoint's store and serving its train batches: read where stored, else computed."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .catalogue import CATALOGUE
from .feature_store import FeatureStore
from .identity import batch_at, batch_fingerprint, store_identity, trusts_train_loader

if TYPE_CHECKING:
    from ..distributed import LocalSharding, Sharding
    from ..featurize import ParamBlock

log = logging.getLogger("sdi.store")


def checkpoint_store(
    root: str | Path,
    checkpoint_path: str | Path,
    *,
    digest: str,
    estimator: dict[str, Any],
    inputs: Mapping[str, Any],
    blocks: Sequence[ParamBlock],
    per_step: bool,
    sharding: Sharding | LocalSharding,
) -> FeatureStore:
    """The store of one checkpoint's train features under ``root`` (arguments as in
    :func:`store_identity`; ``per_step`` picks the layout).

    One folder per checkpoint content and layout (``<digest[:16]>-<layout>``), and per rank when
    sharded: a checkpoint rewritten with new weights gets a folder of its own. Everything else in
    the identity is checked against the folder's catalogue (:class:`StoreMismatchError`).
    """
    layout = "per_step" if per_step else "summed"
    identity = store_identity(estimator, blocks, checkpoint_path, digest, layout, sharding, inputs)
    return FeatureStore(sharding.store_folder(Path(root) / f"{digest[:16]}-{layout}"), identity)


class RowCounts:
    """Rows and batches a pass served from the store and computed into it (for progress)."""

    def __init__(self) -> None:
        self.served_rows = self.served_batches = self.stored_rows = self.stored_batches = 0

    def served(self, rows: int) -> None:
        self.served_rows, self.served_batches = self.served_rows + rows, self.served_batches + 1

    def stored(self, rows: int) -> None:
        self.stored_rows, self.stored_batches = self.stored_rows + rows, self.stored_batches + 1

    def __str__(self) -> str:
        return (
            f"served {self.served_rows} rows ({self.served_batches} batches) from the store, "
            f"computed and stored {self.stored_rows} rows ({self.stored_batches} batches)"
        )


def read_or_compute(
    store: FeatureStore,
    batches: Iterable[Any],
    compute: Callable[[Any], tuple[torch.Tensor, int]],
    device: torch.device | str,
    *,
    allow_empty: bool,
    after_append: Callable[[], Any] | None = None,
    on_rows: Callable[[RowCounts], Any] | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(features, steps)`` per batch of ``batches``: read where stored, else ``compute(batch)``
    and appended (then ``after_append()``, a progress bar's update). ``on_rows`` is called after
    every batch with the rows served and stored so far (a progress bar's postfix).

    Every batch is fingerprinted (:func:`batch_fingerprint`) and checked against its stored block,
    complete store or not, so other train data is a :class:`StoreMismatchError` naming the batch; a
    loader with more or fewer batches than a complete store holds is one too. A corrupt block is
    recomputed from its batch. An interrupted store is resumed: stored batches are read, the rest
    computed and appended; the store is marked complete once ``batches`` is exhausted
    (``allow_empty``: a rank may own no batch). With :func:`trusts_train_loader`, a complete store
    is read without iterating ``batches`` (a corrupt block is still recomputed from its batch).
    """
    counts = RowCounts()
    if store.complete and trusts_train_loader():
        for features, steps in _read_trusting(store, batches, compute, device):
            counts.served(features.shape[0])
            if on_rows is not None:
                on_rows(counts)
            yield features, steps
        log.info("feature store %s: %s (train loader trusted)", store.root, counts)
        return
    n = 0
    for n, batch in enumerate(batches, 1):
        i, fingerprint = n - 1, batch_fingerprint(batch)
        if i < store.stored:  # stored by an earlier (maybe interrupted) run: read it
            store.check_fingerprint(i, fingerprint)
            features = store.read(i, device, recompute=lambda b=batch: compute(b))
            steps = store.entry(i).steps
            counts.served(features.shape[0])
        else:
            store.check_batches(n, at_least=True)  # before featurising a batch a store lacks
            features, steps = compute(batch)
            store.append(features, steps, fingerprint=fingerprint)
            counts.stored(features.shape[0])
            if after_append is not None:
                after_append()
        if on_rows is not None:
            on_rows(counts)
        yield features, steps
    store.finish(n, allow_empty=allow_empty)
    log.info("feature store %s: %s; it holds %d batches, complete", store.root, counts, n)


def _read_trusting(store, batches, compute, device) -> Iterator[tuple[torch.Tensor, int]]:
    """A complete store's batches, the train loader read only to recompute a corrupt block."""

    def recompute(i):  # from its batch, if the loader still has it unchanged
        batch = batch_at(batches, i)
        if batch is None:
            return None
        store.check_fingerprint(i, batch_fingerprint(batch))
        return compute(batch)

    for i in range(store.batches):
        features = store.read(i, device, recompute=lambda i=i: recompute(i))
        yield features, store.entry(i).steps


def describe(folder: str | Path) -> dict[str, Any]:
    """What a store folder holds, read without an identity to check (for tests and tools):
    ``identity``, ``complete``, ``batches`` and ``rows`` (per stored batch, in order)."""
    db = sqlite3.connect(f"file:{Path(folder) / CATALOGUE}?mode=ro", uri=True)
    try:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        rows = [r for (r,) in db.execute("SELECT rows FROM batches ORDER BY idx")]
    finally:
        db.close()
    return {**{k: meta[k] for k in ("identity", "complete", "batches")}, "rows": rows}
