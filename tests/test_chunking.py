"""tiles: every cell of an output exactly once, in tiles no larger than asked."""

from __future__ import annotations

import pytest
import torch

from sdi.chunking import tiles


@pytest.mark.parametrize(
    "n_rows, n_cols, row_chunk, col_chunk, biggest",
    [
        (7, 5, 3, 2, (3, 2)),
        (7, 5, None, 2, (7, 2)),
        (7, 5, 0, -1, (7, 5)),  # not positive: the whole dimension
        (1, 9, 4, 20, (1, 9)),
        (6, 4, 6, 4, (6, 4)),
    ],
)
def test_tiles_cover_every_cell_once(n_rows, n_cols, row_chunk, col_chunk, biggest):
    seen = torch.zeros(n_rows, n_cols, dtype=torch.int64)
    shapes = set()
    for rows, cols in tiles(n_rows, n_cols, row_chunk, col_chunk):
        seen[rows, cols] += 1
        shapes.add((rows.stop - rows.start, cols.stop - cols.start))
    assert (seen == 1).all()
    assert max(shapes) == biggest and all(r > 0 and c > 0 for r, c in shapes)


def test_no_tiles_for_an_empty_dimension():
    assert list(tiles(0, 5, 2, 2)) == [] and list(tiles(4, 0, None, None)) == []
