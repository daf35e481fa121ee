"""The store's catalogue: one SQLite database saying where every stored train batch lies.

Tables: ``meta`` (the format, the identity as JSON, whether the store is complete and with how many
batches), ``files`` (every data file and the end of its cataloged bytes) and ``batches`` (per train
batch: its data file, byte offset and size, rows, loop steps, shape, dtype, checksum of its bytes
and the fingerprint of the train batch it came from). Every change is one transaction (``BEGIN
IMMEDIATE``: SQLite's write lock, which serialises writers in several processes) in WAL mode, so a
process killed at any instant leaves the catalogue as of its last commit, and readers never wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    DELETE_HINT,
    CorruptCatalogueError,
    OldStoreFormatError,
    StoreError,
    StoreMismatchError,
    StoreWriteError,
)
from .identity import FORMAT_VERSION

CATALOGUE = "catalogue.sqlite"
BUSY_TIMEOUT_S = 600.0  # how long a writer waits for another one's transaction
_PAGE_BYTES = 4096  # SQLite's default page: what a catalogue write needs at least
_FILE_NAME = re.compile(r"data_[0-9]{6}\.bin")
_COLUMNS = {
    "meta": ["key", "value"],
    "files": ["file_no", "name", "end_offset"],
    "batches": [
        "idx",
        "file",
        "offset",
        "nbytes",
        "rows",
        "steps",
        "shape",
        "dtype",
        "checksum",
        "fingerprint",
    ],
}
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (file_no INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                    end_offset INTEGER NOT NULL CHECK (end_offset >= 0));
CREATE TABLE batches (idx INTEGER PRIMARY KEY CHECK (idx >= 0), file TEXT NOT NULL,
                      offset INTEGER NOT NULL CHECK (offset >= 0),
                      nbytes INTEGER NOT NULL CHECK (nbytes >= 0), rows INTEGER NOT NULL,
                      steps INTEGER NOT NULL, shape TEXT NOT NULL, dtype TEXT NOT NULL,
                      checksum TEXT NOT NULL, fingerprint TEXT);
"""
_SELECT = "SELECT " + ", ".join(_COLUMNS["batches"]) + " FROM batches"


@dataclasses.dataclass(frozen=True)
class BatchEntry:
    """Where one train batch's features lie: ``nbytes`` bytes at ``offset`` of data file ``file``,
    an array of ``shape`` (``rows`` first) and ``dtype``; ``checksum`` of those bytes; ``fingerprint``
    of the train batch (``None``: not checked)."""

    index: int
    file: str
    offset: int
    nbytes: int
    rows: int
    steps: int
    shape: tuple[int, ...]
    dtype: str
    checksum: str
    fingerprint: str | None


@dataclasses.dataclass(frozen=True)
class CatalogueState:
    """How many batches are stored (indices ``0..stored-1``), and whether the store is complete."""

    stored: int
    complete: bool
    batches: int | None


class Catalogue:
    """The SQLite catalogue of the store in ``root``, created with ``identity`` or checked against it.

    Raises :class:`OldStoreFormatError` for a store of another format, :class:`StoreMismatchError`
    for another identity and :class:`CorruptCatalogueError` for a catalogue SQLite cannot read, that
    fails SQLite's ``quick_check``, or lacks a table, a column or a value this module writes.
    """

    def __init__(self, root: Path, identity: dict[str, Any]):
        self.root, self.path = root, root / CATALOGUE
        self._names: set[str] = set()  # data file names already checked
        if self.path.exists() and self.path.stat().st_size == 0:
            raise self.corrupt("is empty (0 bytes)")
        if not self.path.exists() and any(root.glob("data_*.bin")):
            raise self.corrupt("is missing, but the folder holds data files")
        with sqlite_errors(self.root):
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # Commits do not wait for the disk: a killed process loses nothing, a power cut the
            # last commits at most (whose blocks then fail their checksums if they are read).
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.transaction():
                if not self._has_table("meta"):
                    for statement in _SCHEMA.split(";")[:-1]:  # not executescript: it commits
                        self.db.execute(statement)
                    self._put_meta(format=FORMAT_VERSION, identity=identity, complete=False)
                    self._put_meta(batches=None)
            self._check(identity)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

    def corrupt(self, what: str) -> CorruptCatalogueError:
        return CorruptCatalogueError(self.root, CATALOGUE, what)

    # -- reading ---------------------------------------------------------------------------------

    def state(self, full: bool = True) -> CatalogueState:
        """The store's state; ``full=False`` skips counting the rows (``O(n)``) and trusts the
        highest index (``O(log n)``): what an append needs."""
        with sqlite_errors(self.root):
            (end,) = self.db.execute("SELECT coalesce(max(idx) + 1, 0) FROM batches").fetchone()
            count = end
            if full:
                (count,) = self.db.execute("SELECT count(*) FROM batches").fetchone()
            meta = self._meta(("complete", "batches"))
        if count != end:
            raise self.corrupt(f"lists {count} batches, but their indices run to {end - 1}")
        complete, batches = meta["complete"], meta["batches"]
        if not isinstance(complete, bool):
            raise self.corrupt("has a 'complete' that is not true/false")
        if complete and (type(batches) is not int or batches != count):
            raise self.corrupt(f"is marked complete with {batches!r} batches but lists {count}")
        return CatalogueState(count, complete, batches if complete else None)

    def entries(self, start: int, limit: int) -> list[BatchEntry]:
        """The entries of batches ``start``, ``start + 1``, ... (at most ``limit``), in order."""
        with sqlite_errors(self.root):
            rows = self.db.execute(
                f"{_SELECT} WHERE idx >= ? ORDER BY idx LIMIT ?", (start, limit)
            ).fetchall()
        return [self._entry(row) for row in rows]

    def entry(self, index: int) -> BatchEntry | None:
        with sqlite_errors(self.root):
            row = self.db.execute(f"{_SELECT} WHERE idx = ?", (index,)).fetchone()
        return None if row is None else self._entry(row)

    def _entry(self, row: tuple) -> BatchEntry:
        entry = parse_row(row, self._names, self.corrupt)
        self._names.add(entry.file)
        return entry

    # -- writing (inside ``transaction()``) ------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction under SQLite's write lock; rolled back if the block raises."""
        with sqlite_errors(self.root):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise

    def current_file(self) -> tuple[str, int] | None:
        """The data file appended to now and the end of its cataloged bytes (``None``: no file)."""
        row = self.db.execute(
            "SELECT name, end_offset FROM files ORDER BY file_no DESC LIMIT 1"
        ).fetchone()
        if row is not None and not (_FILE_NAME.fullmatch(str(row[0])) and type(row[1]) is int):
            raise self.corrupt(f"has a bad row for data file {row[0]!r}")
        return row

    def add_file(self) -> str:
        (number,) = self.db.execute("SELECT coalesce(max(file_no) + 1, 0) FROM files").fetchone()
        name = f"data_{number:06d}.bin"
        self.db.execute("INSERT INTO files VALUES (?, ?, 0)", (number, name))
        return name

    def put(self, entry: BatchEntry, file_end: int) -> None:
        """Insert or replace ``entry``, and move its data file's end to ``file_end``."""
        self.db.execute("UPDATE files SET end_offset = ? WHERE name = ?", (file_end, entry.file))
        self.db.execute(
            f"INSERT OR REPLACE INTO batches VALUES ({', '.join('?' * len(_COLUMNS['batches']))})",
            (
                entry.index,
                entry.file,
                entry.offset,
                entry.nbytes,
                entry.rows,
                entry.steps,
                json.dumps(list(entry.shape)),
                entry.dtype,
                entry.checksum,
                entry.fingerprint,
            ),
        )

    def mark_complete(self, batches: int) -> None:
        self._put_meta(complete=True, batches=batches)

    # -- internals -------------------------------------------------------------------------------

    def _has_table(self, name: str) -> bool:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.db.execute(query, (name,)).fetchone() is not None

    def _put_meta(self, **values: Any) -> None:
        for key, value in values.items():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def _meta(self, keys: tuple[str, ...] = ("format", "identity", "complete", "batches")) -> dict:
        query = f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(keys))})"
        meta = {}
        for key, value in self.db.execute(query, keys):
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError):
                raise self.corrupt(f"has a meta value {key!r} that is not JSON") from None
        missing = [k for k in keys if k not in meta]
        if missing:
            raise self.corrupt(f"lacks the meta key(s) {', '.join(map(repr, missing))}")
        return meta

    def _check(self, identity: dict[str, Any]) -> None:
        with sqlite_errors(self.root):
            (verdict,) = self.db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                raise self.corrupt(f"fails SQLite's quick_check ({verdict})")
            for table, columns in _COLUMNS.items():
                have = [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]
                if have != columns:
                    raise self.corrupt(f"has table {table!r} with columns {have}, not {columns}")
            meta = self._meta()
        if meta["format"] != FORMAT_VERSION:
            raise OldStoreFormatError(
                self.root,
                f"was written in store format {meta['format']!r}, which this version of sdi "
                f"(format {FORMAT_VERSION}) does not read; {DELETE_HINT.format(root=self.root)}",
            )
        stored = meta["identity"]
        if not isinstance(stored, dict):
            raise self.corrupt("has an identity that is not a JSON object")
        if stored != identity:
            raise StoreMismatchError(
                self.root,
                f"was written for other settings: {_diff(stored, identity)}; pass another "
                f"folder or {DELETE_HINT.format(root=self.root)}",
            )
        self.state()  # its checks


@contextlib.contextmanager
def sqlite_errors(root: Path) -> Iterator[None]:
    """Turn SQLite's errors into the store's: a full disk, a lock held too long, corruption."""
    try:
        yield
    except sqlite3.Error as err:
        code = getattr(err, "sqlite_errorcode", None)
        text = str(err)
        if code == sqlite3.SQLITE_FULL or "full" in text:
            raise StoreWriteError(
                root, CATALOGUE, _PAGE_BYTES, OSError(errno.ENOSPC, f"SQLite: {text}")
            ) from err
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in text:
            raise StoreError(
                root,
                f"{CATALOGUE} stayed locked by another writer for {BUSY_TIMEOUT_S:.0f} s ({text}); "
                "stop the other run or pass another folder",
            ) from err
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
            raise StoreWriteError(
                root, CATALOGUE, 0, OSError(errno.EACCES, f"SQLite: {text}")
            ) from err
        raise CorruptCatalogueError(root, CATALOGUE, f"cannot be read ({text})") from err


def parse_row(row: tuple, checked_names: set[str], corrupt) -> BatchEntry:
    """A ``batches`` row as a :class:`BatchEntry`, or ``corrupt(what)`` raised; file names in
    ``checked_names`` passed the name check before."""
    index = row[0]

    def bad(what: str) -> CorruptCatalogueError:
        return corrupt(f"has a bad row for batch {index}: {what}")

    kinds = (int, str, int, int, int, int, str, str, str, (str, type(None)))
    for name, value, kind in zip(_COLUMNS["batches"], row, kinds, strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"{name!r} is {value!r}")
    _, file, offset, nbytes, rows, steps, shape, dtype, checksum, fingerprint = row
    if file not in checked_names and not _FILE_NAME.fullmatch(file):
        raise bad(f"file {file!r} is not a data file name (data_NNNNNN.bin)")
    try:
        dims = tuple(json.loads(shape))
    except (ValueError, TypeError):
        raise bad(f"shape {shape!r} is not a JSON list of sizes") from None
    if not dims or not all(type(n) is int and n >= 0 for n in dims):
        raise bad(f"shape {shape!r} is not a list of sizes")
    return BatchEntry(index, file, offset, nbytes, rows, steps, dims, dtype, checksum, fingerprint)


def _diff(stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)
