"""The train side of one checkpoint's pass: this rank's train batches, computed or stored."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .featurize import Featurizer, LossFn
from .loaders import batch_features
from .store import FeatureStore, read_or_compute


class TrainStream:
    """``(row offset, features, steps)`` per train batch; iterable once per query chunk.

    Features are ``(b, steps, D)`` if ``per_step`` else ``(b, D)``. Without a ``store`` every pass
    featurises the batches; with one, they are read where stored and computed (and appended)
    otherwise, which resumes an interrupted store (:func:`sdi.store.read_or_compute`). ``loader``
    holds this rank's batches only when sharded, and row offsets count over them; ``may_be_empty``
    says so (a rank may own no batch). ``after_batch`` is called once per featurised batch.

    After a complete pass, :attr:`counts` holds the rows of every batch of that pass: what the
    gathers of :mod:`sdi.distributed` need to put every rank's rows in the loader's order.
    """

    def __init__(
        self,
        featurizer: Featurizer,
        loader: Iterable[Any],
        loss_fn: LossFn,
        *,
        per_step: bool,
        store: FeatureStore | None,
        after_batch: Callable[[], Any],
        may_be_empty: bool = False,
    ):
        self.featurizer, self.loader, self.loss_fn = featurizer, loader, loss_fn
        self.per_step, self.store, self.after_batch = per_step, store, after_batch
        self.may_be_empty = may_be_empty
        self.counts: list[int] = []

    def _compute(self, batch: Any) -> tuple[torch.Tensor, int]:
        return self.featurizer.compute_batch(batch, self.loss_fn, sum_steps=not self.per_step)

    def _batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        if self.store is None:
            return batch_features(
                self.featurizer,
                self.loader,
                self.loss_fn,
                per_step=self.per_step,
                after_batch=self.after_batch,
            )
        return read_or_compute(
            self.store,
            self.loader,
            self._compute,
            self.featurizer.device,
            allow_empty=self.may_be_empty,
            after_append=self.after_batch,
        )

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        offset, counts = 0, []
        for feats, steps in self._batches():
            yield offset, feats, steps
            offset += feats.shape[0]
            counts.append(feats.shape[0])
        self.counts = counts  # a rank may own no batch: the gathers check the whole set
