"""The feature store's named errors and warning; each message names the store, the culprit and the fix."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

DELETE_HINT = "delete the folder {root} (its features are recomputed on the next run)"


class StoreError(ValueError):
    """A feature store that cannot be used as it is; the message names the store and the fix."""

    def __init__(self, store: str | Path, message: str):
        super().__init__(f"feature store {store}: {message}")
        self.store = Path(store)
        self._message = message

    def __reduce__(self):  # picklable across processes, whatever the subclass's arguments
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    (OSError if issubclass(cls, OSError) else Exception).__init__(err, *args)
    err.__dict__.update(state)
    return err


class CorruptShardError(StoreError):
    """The stored block of one train batch (``batch``) in data file ``file`` of ``store`` does not
    hold what the catalogue says (``what``). ``CorruptBlockError`` is the same class."""

    def __init__(self, store: str | Path, file: str, what: str, batch: int | None = None):
        where = f"batch {batch}'s block in {file}" if batch is not None else file
        super().__init__(store, f"{where} {what}")
        self.file, self.what, self.batch = file, what, batch


CorruptBlockError = CorruptShardError


class CorruptCatalogueError(StoreError):
    """``file`` (the SQLite catalogue) of ``store`` is unreadable or incomplete (``what``).
    ``CorruptManifestError``, the name of format 3, is the same class."""

    def __init__(self, store: str | Path, file: str, what: str):
        super().__init__(store, f"{file} {what}; {DELETE_HINT.format(root=store)}")
        self.file, self.what = file, what


CorruptManifestError = CorruptCatalogueError


class StoreMismatchError(StoreError):
    """The store was written for other train data or settings than the caller's."""


class OldStoreFormatError(StoreMismatchError):
    """The folder holds a store written by an earlier version of sdi, in a format this one does not
    read; the message says how to rebuild it (delete the folder: it is recomputed)."""


_WRITE_FIX = {
    errno.ENOSPC: "Free space",
    errno.EDQUOT: "Free space within your quota",
    errno.EFBIG: "Raise the file size limit",
    errno.EROFS: "Make the folder writable",
    errno.EACCES: "Make the folder writable",
}


class StoreWriteError(OSError):
    """Writing ``file`` into ``store`` failed (e.g. a full disk); ``needed`` bytes were to be written."""

    def __init__(self, store: str | Path, file: str, needed: int, cause: OSError):
        free = free_bytes(store)
        super().__init__(
            cause.errno,
            f"feature store {store}: could not write {file} ({needed} bytes needed, "
            f"{'unknown' if free is None else free} bytes free on its disk): "
            f"{cause.strerror or cause}. {_WRITE_FIX.get(cause.errno, 'Fix that')} or pass another "
            "folder, then rerun: the store resumes after its last complete batch",
        )
        self.store, self.file, self.needed = Path(store), file, needed

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.__dict__)


class StoreWarning(UserWarning):
    """A bad block was found and recomputed from its train batch."""


def free_bytes(path: str | Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
