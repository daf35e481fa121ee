"""Helpers of the feature-store tests: a filled store, and faults written into its files as a crash,
a disk or a user would (through the file system and SQLite, never through the store's code)."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import torch

from sdi.store import FeatureStore

IDENTITY = {"kind": "test", "seed": 1}
ROWS, WIDTH = 4, 50  # 800 bytes of float32 per batch
BLOCK = ROWS * WIDTH * 4


def features(i: int, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(100 + i))


def filled(root: Path, n: int = 3, complete: bool = True, **kwargs) -> FeatureStore:
    """A store of ``n`` batches (``features(i)``, fingerprint ``fp<i>``), closed and reopened."""
    with FeatureStore(root, IDENTITY, **kwargs) as store:
        for i in range(n):
            store.append(features(i), steps=3, fingerprint=f"fp{i}")
        if complete:
            store.finish(n)
    return FeatureStore(root, IDENTITY, **kwargs)


def sql(root: Path, statement: str, args: tuple = ()) -> list[tuple]:
    """Run one SQL statement on the store's catalogue (as a user with the sqlite3 shell would)."""
    db = sqlite3.connect(root / "catalogue.sqlite", isolation_level=None)
    try:
        return db.execute(statement, args).fetchall()
    finally:
        db.close()


def span(root: Path, i: int) -> tuple[Path, int, int]:
    """Batch ``i``'s data file, byte offset and size, from the catalogue."""
    ((file, offset, nbytes),) = sql(
        root, "SELECT file, offset, nbytes FROM batches WHERE idx=?", (i,)
    )
    return root / file, offset, nbytes


def edit_bytes(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def full_disk_at(monkeypatch, root: Path, name: str, from_offset: int = 0) -> None:
    """From now on, writes into a file ``name`` under ``root`` at ``from_offset`` or later are
    short, then fail with ENOSPC."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(root)) and Path(target).name == name and offset >= from_offset:
            if len(data) > 1:
                return real(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
