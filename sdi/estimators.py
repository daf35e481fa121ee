"""The public estimators: projected (sketched) and exact TracIn / SDI, drop-in for
``step-decomposed-influence`` 0.1.1.

``influence_across_checkpoints`` streams: per checkpoint it featurises the query set once, then
walks the train loader batch by batch and contracts each batch straight into the output. Train
features are summed over steps while they are computed (per-step train features exist only when
``with_step_matrix=True``) and are dropped after their batch, so memory beyond the model and the
query features is the output tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import influence
from .backend import get_backend
from .checkpoints import (
    CheckpointSpec,
    InfluenceOutputs,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from .featurize import FeatureSet, Featurizer, LossFn


class _Estimator:
    """Featurisation and influence shared by both estimators (``self._featurizer`` set by each)."""

    _featurizer: Featurizer

    @property
    def model(self) -> nn.Module:
        return self._featurizer.model

    def close(self) -> None:
        """Remove every hook from the model."""
        self._featurizer.close()

    def _features(self, loader: Iterable[Any], loss_fn: LossFn, *, sum_steps: bool, bar=None):
        """Yield ``(features, steps)`` per batch of ``loader``."""
        for batch in loader:
            yield self._featurizer.compute_batch(batch, loss_fn, sum_steps=sum_steps)
            if bar is not None:
                bar.update(1)

    def _featurize_all(self, loader, loss_fn, *, sum_steps: bool) -> tuple[torch.Tensor, int]:
        parts, steps = [], None
        for feats, s in self._features(loader, loss_fn, sum_steps=sum_steps):
            if steps is not None and s != steps and not sum_steps:
                raise ValueError(
                    f"batches of one loader have different step counts: {steps} and {s}"
                )
            steps = s
            parts.append(feats)
        if not parts:
            raise ValueError("the loader yielded no batches")
        return torch.cat(parts), steps

    def featurize_loader(self, *, loader: Iterable[Any], loss_fn: LossFn) -> FeatureSet:
        """Per-step features of every example in ``loader``, concatenated in loader order."""
        flat, steps = self._featurize_all(loader, loss_fn, sum_steps=False)
        return self._featurizer.feature_set(flat, steps)

    def influence_across_checkpoints(
        self,
        *,
        checkpoints: Sequence[CheckpointSpec],
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        loss_fn: LossFn,
        mode: Literal["sdi", "tracin"] = "sdi",
        with_step_matrix: bool = False,
        train_chunk_size: int | None = None,
        query_chunk_size: int | None = None,
        load_checkpoint_fn: Callable[[str | Path], dict[str, Any]] = default_load_checkpoint,
        load_model_state_dict_fn: Callable[
            [nn.Module, dict[str, Any]], None
        ] = default_load_model_state_dict,
        eta_from_checkpoint_fn: Callable[[dict[str, Any]], float] = default_eta_from_checkpoint,
        progress: bool = False,
        progress_desc: str = "checkpoints",
    ) -> InfluenceOutputs:
        """SDI and TracIn summed over checkpoints with weights ``eta_k``.

        For each checkpoint: load it (``load_checkpoint_fn``), load the model
        (``load_model_state_dict_fn``), switch to eval mode, featurise the query set, then stream
        the train set. Returns :class:`InfluenceOutputs` with ``sdi (N_train, N_query, steps_q)``
        (``None`` in ``mode="tracin"``), ``tracin (N_train, N_query)`` and, with
        ``with_step_matrix=True``, ``sdi_matrix (N_train, N_query, steps_tr, steps_q)``. Rows follow
        the train loader's order, columns the query loader's. The chunk sizes bound the size of one
        contraction's temporaries.
        """
        if mode not in ("sdi", "tracin"):
            raise ValueError(f"mode must be 'sdi' or 'tracin', got {mode!r}")
        if with_step_matrix and mode != "sdi":
            raise ValueError("with_step_matrix=True needs mode='sdi'")
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("no checkpoints given")
        chunks = (train_chunk_size, query_chunk_size)
        totals: dict[str, torch.Tensor] | None = None
        was_training = self.model.training
        try:
            for spec in tqdm(
                checkpoints, desc=str(progress_desc), disable=not progress, dynamic_ncols=True
            ):
                ckpt = load_checkpoint_fn(spec.path)
                weight = (
                    float(spec.weight)
                    if spec.weight is not None
                    else float(eta_from_checkpoint_fn(ckpt))
                )
                load_model_state_dict_fn(self.model, ckpt)
                del ckpt
                self.model.eval()
                query, _ = self._featurize_all(query_loader, loss_fn, sum_steps=mode == "tracin")
                query_sum = query if mode == "tracin" else query.sum(dim=1)
                blocks: dict[str, list[torch.Tensor]] = {}
                train_steps = None
                bar = tqdm(desc="train batches", unit="batch", leave=False, disable=not progress)
                for feats, steps in self._features(
                    train_loader, loss_fn, sum_steps=not with_step_matrix, bar=bar
                ):
                    if with_step_matrix:
                        if train_steps is not None and steps != train_steps:
                            raise ValueError(
                                f"train batches have different step counts: {train_steps} and {steps}"
                            )
                        train_steps = steps
                        blocks.setdefault("sdi_matrix", []).append(
                            influence.step_matrix(feats, query, *chunks)
                        )
                        feats = feats.sum(dim=1)
                    if mode == "sdi":
                        blocks.setdefault("sdi", []).append(
                            influence.query_sdi(feats, query, *chunks)
                        )
                    else:
                        blocks.setdefault("tracin", []).append(
                            influence.tracin(feats, query_sum, *chunks)
                        )
                bar.close()
                if not blocks:
                    raise ValueError("train_loader yielded no batches")
                totals = _accumulate(totals, blocks, weight)
        finally:
            self.model.train(was_training)
        if mode == "tracin":
            return InfluenceOutputs(sdi=None, tracin=totals["tracin"], sdi_matrix=None)
        return InfluenceOutputs(
            sdi=totals["sdi"], tracin=totals["sdi"].sum(dim=2), sdi_matrix=totals.get("sdi_matrix")
        )


def _accumulate(
    totals, blocks: dict[str, list[torch.Tensor]], weight: float
) -> dict[str, torch.Tensor]:
    """Add ``weight`` times one checkpoint's row blocks to the running totals."""
    if totals is None:
        return {key: torch.cat(parts).mul_(weight) for key, parts in blocks.items()}
    for key, parts in blocks.items():
        rows = sum(p.shape[0] for p in parts)
        if rows != totals[key].shape[0]:
            raise ValueError(
                f"train_loader yielded {rows} examples at this checkpoint but {totals[key].shape[0]} before"
            )
        start = 0
        for part in parts:
            totals[key][start : start + part.shape[0]].add_(part, alpha=weight)
            start += part.shape[0]
    return totals


class ProjectedTracInSDI(_Estimator):
    """Projected TracIn and SDI: per-example gradients sketched during backward, never materialised.

    ``nn.Linear.weight`` and ``nn.Embedding.weight`` are TensorSketched, ``nn.Linear.bias`` and other
    1-D parameters (norm layers, via Opacus' per-sample rules) CountSketched, all into
    ``projection_size`` buckets per parameter with hash tables drawn from ``seed``. The kernels come
    from ``SDI_BACKEND`` (see :mod:`sdi.backend`).

    Args:
        model: the whole model; ``loss_fn(model, batch)`` runs it.
        target_modules: the module(s) whose trainable parameters are analysed -- for a looped model,
            the recurrent core, so that its ``steps`` uses become the SDI steps.
        projection_size: sketch size ``m`` per parameter (error shrinks like ``1/sqrt(m)``).
        seed: seed of the hash tables; one seed gives one sketch on every device and backend.
        loss_reduction: ``"sum"`` or ``"mean"`` (how a per-example loss vector is reduced, or how
            a scalar loss was reduced over the batch); features are always per-example gradients.
        batch_first: whether activations are ``(B, T, ...)`` (else ``(T, B, ...)``).
        expected_steps: if given, the observed loop steps must equal it.
        allow_mixed_steps: put parameters used once before / after the loop into prelude / readout
            step slots instead of failing.
        strict: refuse selected modules that have buffers.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        target_modules: nn.Module | Sequence[nn.Module],
        projection_size: int = 2048,
        seed: int = 0,
        loss_reduction: str = "sum",
        batch_first: bool = True,
        expected_steps: int | None = None,
        allow_mixed_steps: bool = False,
        strict: bool = True,
    ) -> None:
        if int(projection_size) <= 0:
            raise ValueError(f"projection_size must be positive, got {projection_size}")
        self._featurizer = Featurizer(
            model=model,
            target_modules=target_modules,
            projection_size=int(projection_size),
            seed=int(seed),
            backend=get_backend(),
            loss_reduction=loss_reduction,
            batch_first=batch_first,
            expected_steps=expected_steps,
            allow_mixed_steps=allow_mixed_steps,
            strict=strict,
        )


class FullGradientTracInSDI(_Estimator):
    """Exact TracIn and SDI from materialised per-example, per-use gradients (small models only).

    Same arguments as :class:`ProjectedTracInSDI` without ``projection_size`` and ``seed``. Features
    are ``(N, steps, *param.shape)`` per parameter; memory grows with the parameter count.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        target_modules: nn.Module | Sequence[nn.Module],
        loss_reduction: str = "sum",
        batch_first: bool = True,
        expected_steps: int | None = None,
        allow_mixed_steps: bool = False,
        strict: bool = True,
    ) -> None:
        self._featurizer = Featurizer(
            model=model,
            target_modules=target_modules,
            projection_size=None,
            loss_reduction=loss_reduction,
            batch_first=batch_first,
            expected_steps=expected_steps,
            allow_mixed_steps=allow_mixed_steps,
            strict=strict,
        )
