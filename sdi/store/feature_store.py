"""One store folder: the catalogue and the packed data files behind verified reads and appends."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .catalogue import BatchEntry, Catalogue, CatalogueState
from .errors import (
    DELETE_HINT,
    CorruptShardError,
    OldStoreFormatError,
    StoreMismatchError,
    StoreWarning,
)
from .identity import FORMAT_VERSION
from .packed import DATA_FILE_BYTES, DataFiles
from .verify import as_features, check_entry
from .writing import check_finish, must_write, write_block

log = logging.getLogger("sdi.store")
_PAGE = 4096  # catalogue entries fetched at once when reading in order


class FeatureStore:
    """Train features of one checkpoint, ``(b, D)`` (summed over steps) or ``(b, S, D)`` per batch.

    Args:
        root: the store's folder (created if missing).
        identity: JSON-able dict of everything the features depend on; must equal the stored one.
        file_bytes: the size at which a data file is rolled over.

    ``stored`` is how many batches the catalogue held when this object last looked (batches
    ``0..stored-1``), ``complete`` whether every batch is stored and ``batches`` how many a complete
    store holds; :meth:`entry` says where batch ``i`` lies. The view is refreshed whenever this
    object writes, so batches another process stored are adopted, never stored twice.

    Durability: a block's bytes are in the OS's cache (``pwrite``), which outlives a killed
    process, before the transaction that catalogues them commits; data files are ``fdatasync``ed
    at a roll-over, before the store is marked complete and on :meth:`close`, not per append (a
    sync per append cost ~3 ms here, more than the append). After a power cut or an OS crash, a
    cataloged block whose bytes never reached the disk fails its checksum and is recomputed.
    """

    def __init__(
        self, root: str | Path, identity: dict[str, Any], *, file_bytes: int = DATA_FILE_BYTES
    ):
        self.root = Path(root)
        self.identity = {"format": FORMAT_VERSION, **identity}
        self.file_bytes = file_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        _refuse_format_3(self.root)
        self._catalogue = Catalogue(self.root, self.identity)
        self._data = DataFiles(self.root)
        self._page: list[BatchEntry] = []
        self._adopt(self._catalogue.state())
        log.info(
            "feature store %s: %d batches stored%s",
            self.root,
            self.stored,
            ", complete" if self.complete else "",
        )

    def entry(self, index: int) -> BatchEntry:
        """Where batch ``index`` (``< stored``) lies, from a page of entries read in order."""
        k = index - (self._page[0].index if self._page else 0)
        if not (0 <= k < len(self._page)):
            self._page, k = self._catalogue.entries(index, _PAGE), 0
        if k >= len(self._page) or self._page[k].index != index:
            raise self._catalogue.corrupt(f"has no row for batch {index} below {self.stored}")
        return self._page[k]

    # -- reading ---------------------------------------------------------------------------------

    def read(
        self,
        index: int,
        device: torch.device | str = "cpu",
        *,
        recompute: Callable[[], tuple[torch.Tensor, int] | None] | None = None,
    ) -> torch.Tensor:
        """Batch ``index``'s features as a float32 tensor on ``device``, verified (checksum, size,
        shape) against its catalogue entry.

        A block that fails a check raises :class:`CorruptShardError`, unless ``recompute`` is given
        and returns ``(features, steps)`` for its batch: then it warns (:class:`StoreWarning`),
        stores the batch anew and returns those features. ``recompute`` returning ``None`` means the
        batch is not available: the error is raised, saying so.
        """
        try:
            return _on(self._verified(index), device)
        except CorruptShardError as first:
            error = first
        self._page = []  # another writer may have stored it anew: read its entry and file afresh
        try:
            return _on(self._verified(index, fresh=True), device)
        except CorruptShardError as second:
            error = second
        fresh = None if recompute is None else recompute()
        if fresh is None:
            if recompute is not None:
                raise CorruptShardError(
                    self.root,
                    error.file,
                    f"{error.what}, and its train batch {index} is not in the train loader to "
                    "recompute it; " + DELETE_HINT.format(root=self.root),
                    index,
                ) from error
            raise error
        features, steps = fresh
        warnings.warn(f"{error}; recomputing it from its train batch", StoreWarning, stacklevel=2)
        self.replace(index, features, steps)
        return features.to(device)

    def _verified(self, index: int, fresh: bool = False) -> torch.Tensor:
        entry = self.entry(index)
        check_entry(self.root, entry)
        data = self._data.read(entry.file, entry.offset, entry.nbytes, index, fresh)
        return as_features(self.root, entry, data)

    # -- checks ----------------------------------------------------------------------------------

    def check_fingerprint(self, index: int, fingerprint: str) -> None:
        """Raise :class:`StoreMismatchError` if the caller's batch ``index`` (its
        :func:`batch_fingerprint`) is not the batch whose features are stored as batch ``index``;
        a batch stored without a fingerprint is not checked."""
        entry = self.entry(index)
        if entry.fingerprint is not None and entry.fingerprint != fingerprint:
            raise StoreMismatchError(
                self.root,
                f"train batch {index} differs from the batch whose features it holds ({entry.file}; "
                f"fingerprint {entry.fingerprint[:12]}... stored, {fingerprint[:12]}... now): the "
                "train loader yields other data or batch sizes than when the store was written; "
                f"pass another folder or {DELETE_HINT.format(root=self.root)}",
            )

    def check_batches(self, batches: int, *, at_least: bool = False) -> None:
        """Raise :class:`StoreMismatchError` if a complete store holds another number of batches
        (``at_least``: the loader yields ``batches`` or more, which is known before its end)."""
        if self.complete and (batches > self.batches if at_least else batches != self.batches):
            yields = f"at least {batches}" if at_least else str(batches)
            raise StoreMismatchError(
                self.root,
                f"it holds {self.batches} train batches, but the train loader yields {yields}; "
                f"pass another folder or {DELETE_HINT.format(root=self.root)}",
            )

    # -- writing ---------------------------------------------------------------------------------

    def append(self, features: torch.Tensor, steps: int, *, fingerprint: str | None = None) -> None:
        """Store one batch's features as batch ``stored``: its bytes into the current data file,
        then its entry, in one catalogue transaction. If another process stored that batch
        meanwhile, its entry is adopted instead (after checking both came from the same batch)."""
        index = self.stored
        with self._catalogue.transaction():
            state = self._catalogue.state(full=False)
            if must_write(self._catalogue, state, index, fingerprint):
                write_block(
                    self._catalogue,
                    self._data,
                    self.file_bytes,
                    index,
                    features,
                    steps,
                    fingerprint,
                )
        self._adopt(CatalogueState(max(state.stored, index + 1), state.complete, state.batches))

    def replace(
        self, index: int, features: torch.Tensor, steps: int, *, fingerprint: str | None = None
    ) -> None:
        """Store batch ``index`` anew (recomputed features), keeping its fingerprint if none is
        given; its old block becomes dead bytes in its data file."""
        with self._catalogue.transaction():
            old = self._catalogue.entry(index)
            if old is None:
                raise IndexError(f"feature store {self.root} has no batch {index} to replace")
            fingerprint = old.fingerprint if fingerprint is None else fingerprint
            write_block(
                self._catalogue, self._data, self.file_bytes, index, features, steps, fingerprint
            )
        self._page = []

    def finish(self, batches: int | None = None, *, allow_empty: bool = False) -> None:
        """Mark the store complete with ``batches`` train batches (default: those stored).

        Raises :class:`StoreError` for a store without a batch (unless ``allow_empty``: a rank that
        owns no batch) and :class:`StoreMismatchError` if ``batches`` is not the number stored.
        """
        self._data.sync()  # every block on the disk before the store says it is complete
        with self._catalogue.transaction():
            state = self._catalogue.state()
            batches = check_finish(self.root, state, batches, allow_empty)
            if not state.complete:
                self._catalogue.mark_complete(batches)
        self._adopt(self._catalogue.state(full=False))

    def _adopt(self, state: CatalogueState) -> None:
        self.stored, self.complete, self.batches = state.stored, state.complete, state.batches

    def close(self) -> None:
        """Sync and close the data files and the catalogue (also done when collected)."""
        self._data.sync()
        self._data.close()
        self._catalogue.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if "_catalogue" in self.__dict__:
            self.close()


def _on(features: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    # ``.to`` costs microseconds even when it has nothing to do: a lot next to an 8 KiB read
    return features if getattr(device, "type", device) == "cpu" else features.to(device)


def _refuse_format_3(root: Path) -> None:
    if (root / "manifest.json").exists() or next(root.glob("shard_*.npy"), None) is not None:
        raise OldStoreFormatError(
            root,
            "holds a store written by an earlier version of sdi (manifest.json and one "
            "shard_NNNNNN.npy per batch: store format 3), which this version (format "
            f"{FORMAT_VERSION}: packed data files and a SQLite catalogue) does not read; to "
            f"rebuild it, {DELETE_HINT.format(root=root)}",
        )
