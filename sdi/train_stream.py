"""The train side of one checkpoint's pass: this rank's train batches, computed or stored."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch

from .featurize import Featurizer, LossFn
from .store import FeatureStore, RowCounts, read_or_compute
from .validation import NonFiniteRows


class TrainStream:
    """``(row offset, features, steps)`` per train batch; iterable once per query chunk.

    Features are ``(b, steps, D)`` if ``per_step`` else ``(b, D)``. Without a ``store`` every pass
    featurises the batches; with one, they are read where stored and computed (and appended)
    otherwise, which resumes an interrupted store (:func:`sdi.store.read_or_compute`). ``loader``
    holds this rank's batches only when sharded, and row offsets count over them; ``may_be_empty``
    says so (a rank may own no batch). ``after_batch`` is called once per train batch, featurised
    or read from the store (a progress bar's update), and ``on_store_rows`` (with a store) before
    it with the rows served from and stored into the store so far (:class:`sdi.store.RowCounts`:
    the bar's postfix).

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
        name: str = "train_loader",
        on_store_rows: Callable[[RowCounts], Any] | None = None,
    ):
        self.featurizer, self.loader, self.loss_fn = featurizer, loader, loss_fn
        self.per_step, self.store, self.after_batch = per_step, store, after_batch
        self.may_be_empty, self.name, self.on_store_rows = may_be_empty, name, on_store_rows
        self.counts: list[int] = []
        self._offset, self._report = 0, NonFiniteRows(name)  # of the pass in flight

    def _compute(self, batch: Any) -> tuple[torch.Tensor, int]:
        # Batches are computed in order, each once the previous one's rows were counted.
        on_losses = partial(self._report.add_losses, offset=self._offset)
        return self.featurizer.compute_batch(
            batch, self.loss_fn, sum_steps=not self.per_step, on_losses=on_losses
        )

    def _batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        if self.store is None:
            for batch in self.loader:
                yield self._compute(batch)
                self.after_batch()
            return
        for item in read_or_compute(
            self.store,
            self.loader,
            self._compute,
            self.featurizer.device,
            allow_empty=self.may_be_empty,
            on_rows=self.on_store_rows,
        ):
            yield item
            self.after_batch()  # read or computed: the bar counts every batch of the pass

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, int]]:
        self._offset, self._report, counts = 0, NonFiniteRows(self.name), []
        for feats, steps in self._batches():
            self._report.add_features(feats, self._offset)  # stored features are checked too
            yield self._offset, feats, steps
            self._offset += feats.shape[0]
            counts.append(feats.shape[0])
        self.counts = counts  # a rank may own no batch: the gathers check the whole set
        self._report.warn()
