"""Packed data files: the stored batches' bytes, one block after another in a few large files.

``data_000000.bin``, ``data_000001.bin``, ...: a new file is started once the current one would
pass :data:`DATA_FILE_BYTES`, so 10^6 small batches make a few files, not 10^6. Blocks are only
ever written past the current file's cataloged end (under the catalogue's write lock), so bytes
a killed writer left past that end are garbage nobody points to: the next writer cuts them off.
Reads copy a block out of a memory map of its file.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import numpy as np

from .errors import CorruptShardError, StoreWriteError

DATA_FILE_BYTES = 256 << 20  # a data file is rolled over before it passes this size


class DataFiles:
    """Reads and writes blocks of the data files in ``root``; holds their descriptors and maps."""

    def __init__(self, root: Path):
        self.root = root
        self._writing: dict[str, int] = {}  # name -> descriptor open for writing
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}  # name -> (descriptor, map) for reads

    def write(self, name: str, end: int, data: memoryview) -> None:
        """Write ``data`` at byte ``end`` of ``name`` (created if missing), cutting off whatever a
        killed writer left past ``end`` first. Raises :class:`StoreWriteError` (a full disk...)."""
        fd = self._writing.get(name)
        try:
            if fd is None:
                fd = self._writing[name] = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o666)
            if os.fstat(fd).st_size > end:
                os.ftruncate(fd, end)
            done = 0
            while done < len(data):
                n = os.pwrite(fd, data[done:], end + done)
                if n <= 0:  # no progress: a full disk that did not say so
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as err:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)  # no half block left behind
            raise StoreWriteError(self.root, name, len(data), err) from err

    def sync(self) -> None:
        """Flush every file written by this object to the disk (``fdatasync``)."""
        for fd in self._writing.values():
            with contextlib.suppress(OSError):
                os.fdatasync(fd)

    def retire(self, keep: str) -> None:
        """Sync and close the files written to other than ``keep`` (after a roll-over)."""
        for name in [n for n in self._writing if n != keep]:
            fd = self._writing.pop(name)
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.close(fd)

    def read(
        self, name: str, offset: int, nbytes: int, batch: int, fresh: bool = False
    ) -> np.ndarray:
        """A copy of bytes ``offset .. offset + nbytes`` of ``name`` (``uint8``); raises
        :class:`CorruptShardError` if the file is missing, empty or ends before the block.

        The file's map is kept; ``fresh`` opens it anew by name (after a failed check: another
        writer may have replaced it). The file's size is checked on every read, so a file cut
        short under a held map is an error, never a ``SIGBUS``.
        """
        end = offset + nbytes
        held = None if fresh else self._maps.get(name)
        if held is None or len(held[1]) < end or os.fstat(held[0]).st_size < end:
            held = self._open(name, end, batch)
        return np.frombuffer(held[1], np.uint8, count=nbytes, offset=offset).copy()

    def _open(self, name: str, end: int, batch: int) -> tuple[int, mmap.mmap]:
        def bad(what: str) -> CorruptShardError:
            return CorruptShardError(self.root, name, what, batch)

        self._drop(name)
        try:
            fd = os.open(self.root / name, os.O_RDONLY)
        except FileNotFoundError:
            raise bad(f"cannot be read: {name} is missing") from None
        except OSError as err:
            raise bad(f"cannot be read ({err})") from err
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise bad(f"cannot be read: {name} is empty (0 bytes)")
            if size < end:
                raise bad(f"is truncated: {name} has {size} bytes, the block ends at byte {end}")
            try:
                held = self._maps[name] = (fd, mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
            except (OSError, ValueError) as err:  # ValueError: emptied since the size was read
                raise bad(f"cannot be read ({err})") from err
        except BaseException:
            os.close(fd)
            raise
        return held

    def _drop(self, name: str) -> None:
        held = self._maps.pop(name, None)
        if held is not None:
            os.close(held[0])
            with contextlib.suppress(BufferError):  # a view still exported: closed when collected
                held[1].close()

    def close(self) -> None:
        self.retire(keep="")
        for name in list(self._maps):
            self._drop(name)
