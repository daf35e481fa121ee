"""Tiles of an (n_rows, n_cols) output that bound the temporaries of one contraction."""

from __future__ import annotations

from collections.abc import Iterator


def _spans(n: int, size: int | None) -> list[slice]:
    size = max(n, 1) if not size or size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def tiles(
    n_rows: int, n_cols: int, row_chunk: int | None, col_chunk: int | None
) -> Iterator[tuple[slice, slice]]:
    """``(rows, cols)`` slices covering ``n_rows x n_cols`` in tiles of ``row_chunk x col_chunk``;
    a chunk size that is ``None`` or not positive takes the whole dimension."""
    for rows in _spans(n_rows, row_chunk):
        for cols in _spans(n_cols, col_chunk):
            yield rows, cols
