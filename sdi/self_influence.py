"""Self-influence: a set that is both the train and the query set is featurised once per checkpoint.

When ``train_loader is query_loader`` (the paper's setup; duplicate and memorisation studies), a
checkpoint's pass would run the same forward and backward twice: once for the query side (per-step
features in ``mode="sdi"``) and once for the train side (summed over steps). Here each batch runs
once: where both sides want the same layout the one tensor serves both, else
:meth:`sdi.featurize.Featurizer.compute_batch_both` computes both layouts from one backward, each
bitwise equal to its own featurisation. The pairs and the train side then behave as those of
:mod:`sdi.passes` (same chunk, same row offsets, same reports of non-finite rows), so the outputs
are bitwise equal to featurising twice (``tests/test_self_influence.py``).

Used only where the result is the same: one process (sharded, the train side holds one rank's
batches), no ``train_store`` (its stored train features are read instead, and written by the store's
own code), and a set whose query features fit in one chunk of ``max_query_bytes``. A larger set is
featurised as before, after this has dropped the one chunk it computed (that chunk costs one extra
featurisation of at most ``max_query_bytes`` of features).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .featurize import Featurizer, LossFn
from .loaders import check_one_query_step_count
from .validation import NonFiniteRows


@dataclass
class SharedTrain:
    """The train side of a shared pass: ``(row offset, features, steps)`` per batch, as
    :class:`sdi.train_stream.TrainStream` yields them, from features computed once.

    ``losses`` holds each batch's per-example losses for the report of non-finite rows; after a
    complete pass :attr:`counts` holds the rows of every batch.
    """

    batches: list[tuple[torch.Tensor, int]]
    losses: list[torch.Tensor]
    name: str = "train_loader"
    counts: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        report, offset, counts = NonFiniteRows(self.name), 0, []
        for (feats, steps), losses in zip(self.batches, self.losses, strict=True):
            report.add_losses(losses, offset)
            report.add_features(feats, offset)
            yield offset, feats, steps
            offset += feats.shape[0]
            counts.append(feats.shape[0])
        self.counts = counts
        report.warn()


@dataclass(frozen=True)
class SharedSet:
    """One featurisation of a set: its query features (one chunk) and its train side."""

    query: torch.Tensor  # (N, steps, D) per step, or (N, D) summed
    train: SharedTrain


def featurize_shared(
    featurizer: Featurizer,
    loader: Iterable[Any],
    loss_fn: LossFn,
    *,
    per_step_train: bool,
    per_step_query: bool,
    max_bytes: int,
    after_batch: Callable[[], Any],
    train_name: str = "train_loader",
) -> SharedSet | None:
    """Featurise ``loader`` once for both sides, or ``None`` if its query features need more than
    one chunk of ``max_bytes`` (as :func:`sdi.loaders.query_chunks` would cut them).

    Checks and reports as the two featurisations would: query batches of different step counts
    and an empty loader are errors worded as :func:`sdi.loaders.query_chunks` words them, and
    non-finite rows are reported for ``"query_loader"`` here and for ``train_name`` on every pass
    over the train side. ``after_batch`` is called once per featurised batch.
    """
    query_report = NonFiniteRows("query_loader")
    parts: list[torch.Tensor] = []
    batches: list[tuple[torch.Tensor, int]] = []
    losses: list[torch.Tensor] = []
    offset, held, steps_seen = 0, 0, set()
    batch_iter = iter(loader)
    batch = next(batch_iter, _END)
    while batch is not _END:
        seen: list[torch.Tensor] = []
        query, train, steps = _featurize_both(
            featurizer, batch, loss_fn, per_step_train, per_step_query, seen.append
        )
        query_report.add_losses(seen[0], offset)
        query_report.add_features(query, offset)
        steps_seen.add(steps)
        if per_step_query:
            check_one_query_step_count(steps_seen)
        parts.append(query)
        batches.append((train, steps))
        losses.append(seen[0])
        offset += query.shape[0]
        held += query.numel() * query.element_size()
        after_batch()
        batch = next(batch_iter, _END)
        if held >= max_bytes and batch is not _END:
            return None  # more than one query chunk: the caller featurises as before
    if not parts:
        raise ValueError("query_loader yielded no batches")
    query_report.warn()
    return SharedSet(torch.cat(parts), SharedTrain(batches, losses, train_name))


_END = object()  # the end of the loader


def _featurize_both(
    featurizer: Featurizer,
    batch: Any,
    loss_fn: LossFn,
    per_step_train: bool,
    per_step_query: bool,
    on_losses: Callable[[torch.Tensor], Any],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(query features, train features, steps)`` of one batch from one forward and backward."""
    if per_step_train == per_step_query:  # one layout: the same tensor serves both sides
        feats, steps = featurizer.compute_batch(
            batch, loss_fn, sum_steps=not per_step_query, on_losses=on_losses
        )
        return feats, feats, steps
    per_step, summed, steps = featurizer.compute_batch_both(batch, loss_fn, on_losses=on_losses)
    return (per_step, summed, steps) if per_step_query else (summed, per_step, steps)
