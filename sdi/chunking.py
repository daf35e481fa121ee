"""Index ranges that bound the temporaries of one contraction."""

from __future__ import annotations


def spans(n: int, size: int | None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of ``size``; one piece if ``size``
    is ``None`` or not positive."""
    size = n if not size or size <= 0 else size
    return [(i, min(i + size, n)) for i in range(0, n, size)]
