"""Argument and input checks that run before any work, with errors that name the culprit.

An attribution result that is silently wrong is worse than none: every check here either refuses
an input up front (``TypeError`` / ``ValueError`` naming the argument and the fix) or reports it
(a warning naming the loader rows).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

# torch.Generator.manual_seed takes any value representable as int64 or uint64.
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an ``int``; ``TypeError`` if it is not an integer, ``ValueError`` if out of range.

    Integral floats (``4.0``) and booleans are refused: ``projection_size=2.5`` must not become 2.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_seed(seed: Any) -> int:
    """A hash-table seed that ``torch.Generator.manual_seed`` accepts."""
    return check_int("seed", seed, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])


def check_reiterable(loader: Any, name: str) -> None:
    """Refuse a one-shot iterator: sdi iterates every loader once per checkpoint (and query chunk)."""
    if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
        kind = (
            "an iterator, which can be iterated only once"
            if isinstance(loader, Iterator)
            else "not iterable"
        )
        raise TypeError(
            f"{name} is {kind} ({type(loader).__name__}); sdi iterates it once per checkpoint and "
            "per query chunk. Pass a re-iterable object: a DataLoader, a list of batches, or a class "
            "whose __iter__ starts a new pass."
        )


def non_finite_rows(values: torch.Tensor) -> torch.Tensor:
    """Row indices (int64, on the CPU) of ``values (N, ...)`` holding a NaN or an infinity."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().cpu()


def warn_non_finite(what: str, rows: torch.Tensor, offset: int, loader_name: str) -> None:
    """Warn that ``what`` is NaN/inf for loader rows ``offset + rows`` (nothing if ``rows`` is empty)."""
    if rows.numel() == 0:
        return
    shown = (rows[:10] + offset).tolist()
    more = f" and {rows.numel() - 10} more" if rows.numel() > 10 else ""
    warnings.warn(
        f"{what} is NaN or infinite for {loader_name} rows {shown}{more}; their scores are not "
        "finite (top_influences excludes them)",
        RuntimeWarning,
        stacklevel=4,
    )
