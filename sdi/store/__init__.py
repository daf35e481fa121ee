"""Train features on disk: computed once, reused across query sets, resumable after interruption.

Format 4, and why: one folder per (checkpoint, layout) holding a SQLite catalogue
(``catalogue.sqlite``, :mod:`sdi.store.catalogue`) and a few large data files (``data_000000.bin``
..., :mod:`sdi.store.packed`) into which every train batch's float32 features are appended, one
block after another, a new file every :data:`~sdi.store.packed.DATA_FILE_BYTES`. An append writes
the block's bytes first, then records it (file, byte offset, size, rows, shape, dtype, checksum and
the train batch's fingerprint) in one SQLite transaction: its cost does not grow with what the
store holds, and a process killed at any instant leaves a catalogue that lists only complete blocks
(bytes written past the last cataloged one are garbage, cut off by the next writer). SQLite's write
lock serialises writers in several processes, each adopting the batches another already stored.
Format 3 (``manifest.json`` rewritten on every append and one ``.npy`` file per batch) cost
``O(n)`` per append and a file per batch; a folder in that format is refused with
:class:`OldStoreFormatError`, which says to delete it.

What is checked (the README's "What the store checks"):

- The identity (:func:`store_identity`): what the features depend on; another one is a
  :class:`StoreMismatchError` listing what differs.
- Every train batch's fingerprint (:func:`batch_fingerprint`) on every run, complete store or not,
  and the number of batches of a complete store (:func:`read_or_compute`); the unsafe opt-out
  ``SDI_STORE_TRUST_TRAIN_LOADER=1`` (:func:`trusts_train_loader`) skips the loader.
- Every read: the block's rows, shape, size and checksum (XXH3-128, :mod:`sdi.store.verify`); a bad
  block raises :class:`CorruptShardError` (alias :class:`CorruptBlockError`) naming the data file
  and batch, or is recomputed with a :class:`StoreWarning` when its batch is at hand.
- The catalogue: one SQLite cannot read, that fails ``quick_check`` or lacks a table, column or
  value raises :class:`CorruptCatalogueError` (alias :class:`CorruptManifestError`).
- A full disk raises :class:`StoreWriteError` naming the file and the bytes needed and free.
"""

from .catalogue import CATALOGUE, BatchEntry, Catalogue
from .errors import (
    CorruptBlockError,
    CorruptCatalogueError,
    CorruptManifestError,
    CorruptShardError,
    OldStoreFormatError,
    StoreError,
    StoreMismatchError,
    StoreWarning,
    StoreWriteError,
)
from .feature_store import FeatureStore
from .identity import (
    FORMAT_VERSION,
    TRUST_LOADER_ENV,
    batch_at,
    batch_fingerprint,
    store_identity,
    trusts_train_loader,
)
from .packed import DATA_FILE_BYTES
from .serve import RowCounts, checkpoint_store, describe, read_or_compute

__all__ = [
    "CATALOGUE",
    "DATA_FILE_BYTES",
    "FORMAT_VERSION",
    "TRUST_LOADER_ENV",
    "BatchEntry",
    "Catalogue",
    "CorruptBlockError",
    "CorruptCatalogueError",
    "CorruptManifestError",
    "CorruptShardError",
    "FeatureStore",
    "OldStoreFormatError",
    "RowCounts",
    "StoreError",
    "StoreMismatchError",
    "StoreWarning",
    "StoreWriteError",
    "batch_at",
    "batch_fingerprint",
    "checkpoint_store",
    "describe",
    "read_or_compute",
    "store_identity",
    "trusts_train_loader",
]
