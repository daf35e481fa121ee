"""Temporarily setting ``requires_grad`` of parameters, restoring each one's own flag after."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.nn as nn


@contextmanager
def requires_grad_set(params: Sequence[nn.Parameter], flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` of ``params`` to ``flag``; restore each one's own flag on exit."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, old in zip(params, flags, strict=True):
            p.requires_grad_(old)
