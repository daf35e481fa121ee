"""The options of one estimator call, gathered into one frozen object that checks itself.

The public methods (:mod:`sdi.estimators`) keep the drop-in keyword lists of 0.1.1; each builds a
:class:`RunOptions` and hands it to the stages (:mod:`sdi.passes`, :mod:`sdi.influence`,
:mod:`sdi.topk`), so the keywords are spelled out once and checked once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from .checkpoints import CheckpointSpec, as_checkpoint_specs
from .distributed import GatherTo
from .featurize import LossFn
from .validation import check_int, check_reiterable

DEFAULT_MAX_QUERY_BYTES = 2 << 30  # query features held at once; more -> one train pass per chunk


@dataclass(frozen=True, eq=False)
class RunOptions:
    """What one call computes and how (the keywords of ``influence_across_checkpoints``).

    Raises ``ValueError`` on construction for an unknown ``mode``, ``with_step_matrix`` without
    SDI, no checkpoints, or a ``max_query_bytes`` that is not positive, and what
    :func:`sdi.checkpoints.as_checkpoint_specs` refuses; ``TypeError`` for a loader that cannot be
    iterated more than once (a generator) and a ``max_query_bytes`` or chunk size that is not an integer. ``checkpoints`` is held as a tuple of
    specs, so an iterator serves every pass of the call.
    """

    checkpoints: Sequence[CheckpointSpec]
    train_loader: Iterable[Any]
    query_loader: Iterable[Any]
    loss_fn: LossFn
    load_checkpoint_fn: Callable[[str | Path], dict[str, Any]]
    load_model_state_dict_fn: Callable[[nn.Module, dict[str, Any]], None]
    eta_from_checkpoint_fn: Callable[[dict[str, Any]], float]
    progress: bool = False
    progress_desc: str = "checkpoints"
    max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES
    train_store: str | Path | None = None
    gather_to: GatherTo = 0
    mode: Literal["sdi", "tracin"] = "sdi"
    with_step_matrix: bool = False
    train_chunk_size: int | None = None
    query_chunk_size: int | None = None
    with_standard_errors: bool = False
    by_parameter: bool | Mapping[str, str] = False  # see sdi.parameter_groups

    def __post_init__(self) -> None:
        if self.mode not in ("sdi", "tracin"):
            raise ValueError(f"mode must be 'sdi' or 'tracin', got {self.mode!r}")
        if self.with_step_matrix and self.mode != "sdi":
            raise ValueError("with_step_matrix=True needs mode='sdi'")
        checkpoints = as_checkpoint_specs(self.checkpoints)  # the one place they are normalised
        object.__setattr__(self, "checkpoints", tuple(checkpoints))
        check_int("max_query_bytes", self.max_query_bytes, minimum=1)
        for name in ("train_chunk_size", "query_chunk_size"):  # None or <= 0: no chunking
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_reiterable(self.train_loader, "train_loader")
        check_reiterable(self.query_loader, "query_loader")

    @property
    def chunks(self) -> tuple[int | None, int | None]:
        """``(train_chunk_size, query_chunk_size)``: the bounds on one contraction's temporaries."""
        return self.train_chunk_size, self.query_chunk_size
