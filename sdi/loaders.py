"""Featurisation of a loader: per batch, as the query set's chunks, or whole (``featurize_loader``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from . import distributed
from .featurize import Featurizer, LossFn
from .outputs import FeatureSet
from .validation import NonFiniteRows, check_reiterable


def warn_if_shuffled(loader: Iterable[Any], name: str, stacklevel: int) -> None:
    """Warn that a reshuffling loader gives another example order on every pass."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and (
        isinstance(sampler, RandomSampler) or getattr(sampler, "shuffle", False)
    ):
        warnings.warn(
            f"{name} reshuffles on every pass ({type(sampler).__name__}). sdi iterates it once per "
            "checkpoint (and once per query chunk), so output row i is not the same example across "
            "checkpoints and the summed scores mix examples. Build the loader with shuffle=False.",
            stacklevel=stacklevel + 1,
        )


def batch_features(
    featurizer: Featurizer,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    per_step: bool,
    after_batch: Callable[[], Any] | None = None,
    report: NonFiniteRows | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(features, steps)`` per batch: ``(b, steps, D)`` if ``per_step`` else ``(b, D)``.

    ``after_batch`` is called once a batch's features have been taken (a progress bar's update);
    ``report`` collects the rows whose loss or features are not finite and warns after the pass.
    """
    offset = 0
    for batch in loader:
        on_losses = None if report is None else partial(report.add_losses, offset=offset)
        feats, steps = featurizer.compute_batch(
            batch, loss_fn, sum_steps=not per_step, on_losses=on_losses
        )
        if report is not None:
            report.add_features(feats, offset)
        offset += feats.shape[0]
        yield feats, steps
        if after_batch is not None:
            after_batch()
    if report is not None:
        report.warn()


def check_one_query_step_count(steps: set[int]) -> None:
    """SDI per step needs one step count for the whole query set: refuse ``steps`` of several."""
    if len(steps) > 1:
        raise ValueError(
            f"query batches have different step counts {sorted(steps)} (a data-dependent "
            "loop?): SDI per step needs one count for the query set; put batches of one "
            "count in each call, or use mode='tracin' (summed over steps)"
        )


def query_chunks(
    featurizer: Featurizer,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    per_step: bool,
    max_bytes: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(column offset, features)``: the query set in chunks of about ``max_bytes`` or less."""
    parts: list[torch.Tensor] = []
    offset, held, steps = 0, 0, set()
    report = NonFiniteRows("query_loader")
    for feats, s in batch_features(featurizer, loader, loss_fn, per_step=per_step, report=report):
        steps.add(s)
        if per_step:
            check_one_query_step_count(steps)
        parts.append(feats)
        held += feats.numel() * feats.element_size()
        if held >= max_bytes:
            chunk = torch.cat(parts)
            parts, held = [], 0
            yield offset, chunk
            offset += chunk.shape[0]
    if parts:
        yield offset, torch.cat(parts)
    elif offset == 0:
        raise ValueError(
            "query_loader yielded no batches: an empty dataset, or a DataLoader with "
            "drop_last=True and fewer examples than batch_size?"
        )


def count_batches(loader: Iterable[Any]) -> int | None:
    """The number of batches of ``loader``: its ``len()`` where it has one, else counted by
    iterating it (loading is cheap next to featurising); ``None`` for a one-shot iterator, which
    counting would consume."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        batches = iter(loader)
        return None if batches is loader else sum(1 for _ in batches)


def rows_name(loader_name: str, sharding: distributed.Sharding | distributed.LocalSharding) -> str:
    """How a warning names the rows of ``loader_name`` this process sees: loader rows when it runs
    alone, else the rows of this rank's own batches (``rank``, ``rank + world``, ...)."""
    if sharding.world == 1:
        return loader_name
    return f"{loader_name} (rank {sharding.rank} of {sharding.world}: rows of its own batches)"


def featurize_loader(
    featurizer: Featurizer,
    loader: Iterable[Any],
    loss_fn: LossFn,
    gather_to: distributed.GatherTo,
    *,
    estimator: dict[str, Any],
) -> FeatureSet | None:
    """Per-step features of every example in ``loader``, in loader order; see
    :meth:`sdi.estimators.ProjectedTracInSDI.featurize_loader` for ``gather_to``.

    The model runs in eval mode (dropout off, as in the other entry points); its train/eval mode
    is restored afterwards. Sharded, every rank first checks that all ranks have the same
    ``estimator`` settings (:mod:`sdi.estimators`' identity), parameters and number of batches.
    """
    featurizer.check_open()
    check_reiterable(loader, "loader")
    sharding = distributed.sharding_of(loader, featurizer.device, gather_to, name="loader")
    if sharding.world > 1:
        sharding.check_same(
            {
                **estimator,
                "params": [b.name for b in featurizer.blocks],
                "loader batches": count_batches(loader),
            }
        )
    model = featurizer.model
    was_training = model.training
    model.eval()
    try:
        owned = sharding.owned(loader)
        report = NonFiniteRows(rows_name("loader", sharding))
        batches = batch_features(featurizer, owned, loss_fn, per_step=True, report=report)
        parts = [feats for feats, _ in batches]
    finally:
        model.train(was_training)
    steps = {p.shape[1] for p in parts}
    if len(steps) > 1:
        raise ValueError(
            f"batches of one loader have different step counts {sorted(steps)} (a data-dependent "
            "loop?): features per step need one count; featurise batches of one count per call"
        )
    rows = sharding.gather(
        {"phi": torch.cat(parts)} if parts else {}, counts=[p.shape[0] for p in parts]
    )
    if rows is None:
        return None
    return featurizer.feature_set(rows["phi"], rows["phi"].shape[1])
