"""The public estimators: projected (sketched) and exact TracIn / SDI, drop-in for
``step-decomposed-influence`` 0.1.1.

Both share one streaming pass (:meth:`_Estimator._passes`): per checkpoint, the query set is
featurised once (in chunks of at most ``max_query_bytes``), then the train loader is walked batch
by batch and each batch is contracted straight into the output and dropped. Train features are
summed over steps while they are computed (per-step train features exist only when
``with_step_matrix=True`` needs them), so memory beyond the model is the query features and the
output. With ``train_store=``, train features go to disk once (:mod:`sdi.store`) and are reused.
Under ``torch.distributed`` the train batches are split over the ranks (:mod:`sdi.distributed`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from . import __version__, distributed, influence, uncertainty
from .backend import get_backend
from .checkpoints import (
    CheckpointSpec,
    InfluenceOutputs,
    as_checkpoint_specs,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from .featurize import FeatureSet, Featurizer, LossFn
from .steps import StepPlan
from .store import FeatureStore, batch_at, batch_fingerprint, file_sha256

DEFAULT_MAX_QUERY_BYTES = 2 << 30  # query features held at once; more -> one train pass per chunk


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most and ``k`` least influential train examples for each query.

    Row ``j`` belongs to query ``j`` (query loader order); indices are rows of the train loader.
    ``*_indices (N_query, k)`` int64, ``*_tracin (N_query, k)``, ``*_sdi (N_query, k, steps_query)``;
    ``most_*`` sorted by decreasing TracIn, ``least_*`` by increasing TracIn.
    """

    most_indices: torch.Tensor
    most_tracin: torch.Tensor
    most_sdi: torch.Tensor
    least_indices: torch.Tensor
    least_tracin: torch.Tensor
    least_sdi: torch.Tensor


def _warn_if_shuffled(loader: Iterable[Any], name: str) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and (
        isinstance(sampler, RandomSampler) or getattr(sampler, "shuffle", False)
    ):
        warnings.warn(
            f"{name} reshuffles on every pass ({type(sampler).__name__}). sdi iterates it once per "
            "checkpoint (and once per query chunk), so output row i is not the same example across "
            "checkpoints and the summed scores mix examples. Build the loader with shuffle=False.",
            stacklevel=3,
        )


# One (query chunk, train batch) pair of a pass: (query column offset, query features,
# train row offset, train features, train steps).
Pair = tuple[int, torch.Tensor, int, torch.Tensor, int]


class _Estimator:
    """Featurisation and influence shared by both estimators (``self._featurizer`` set by each)."""

    _featurizer: Featurizer
    _identity: dict[str, Any]  # what a stored feature depends on, besides parameters and checkpoint

    @property
    def model(self) -> nn.Module:
        return self._featurizer.model

    @property
    def step_plan(self) -> StepPlan | None:
        """The step each use of each selected module filled in the last forward pass
        (:class:`sdi.steps.StepPlan`; ``print`` it for a table); ``None`` before the first."""
        return self._featurizer.step_plan

    def close(self) -> None:
        """Remove every hook from the model."""
        self._featurizer.close()

    def _batches(
        self, loader, loss_fn, *, per_step: bool, bar=None
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """``(features, steps)`` per batch: ``(b, steps, D)`` if ``per_step`` else ``(b, D)``."""
        for batch in loader:
            yield self._featurizer.compute_batch(batch, loss_fn, sum_steps=not per_step)
            if bar is not None:
                bar.update(1)

    def featurize_loader(
        self, *, loader: Iterable[Any], loss_fn: LossFn, gather_to: distributed.GatherTo = "all"
    ) -> FeatureSet | None:
        """Per-step features of every example in ``loader``, concatenated in loader order.

        Under ``torch.distributed`` with more than one process, batch ``i`` is featurised by rank
        ``i % world_size`` alone and the rows are gathered to ``gather_to``: ``"all"`` (default)
        gives every rank the whole :class:`FeatureSet`, as one process computes it; a rank gives
        it to that rank and ``None`` to the others; ``None`` gives each rank the rows of its own
        batches, in order. With no process group ``gather_to`` is ignored.
        """
        sharding = distributed.sharding_of(
            loader, self._featurizer.device, gather_to, name="loader"
        )
        owned = loader if sharding is None else sharding.owned(loader)
        try:
            parts = [feats for feats, _ in self._batches(owned, loss_fn, per_step=True)]
            steps = {p.shape[1] for p in parts}
            if len(steps) > 1:
                raise ValueError(
                    f"batches of one loader have different step counts: {sorted(steps)}"
                )
        except Exception as err:
            if sharding is not None:
                sharding.fail(err)  # the other ranks raise too, instead of waiting for this one
            raise
        if sharding is None:
            if not parts:
                raise ValueError("the loader yielded no batches")
            return self._featurizer.feature_set(torch.cat(parts), steps.pop())
        sharding.counts = [p.shape[0] for p in parts]
        rows = sharding.gather({"phi": torch.cat(parts)} if parts else {})
        if rows is None:
            return None
        return self._featurizer.feature_set(rows["phi"], rows["phi"].shape[1])

    def _query_chunks(
        self, loader, loss_fn, *, per_step: bool, max_bytes: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(column offset, features)``: the query set in chunks of about ``max_bytes`` or less."""
        parts: list[torch.Tensor] = []
        offset, held, steps = 0, 0, set()
        for feats, s in self._batches(loader, loss_fn, per_step=per_step):
            steps.add(s)
            if per_step and len(steps) > 1:
                raise ValueError(f"query batches have different step counts: {sorted(steps)}")
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
            raise ValueError("query_loader yielded no batches")

    def _store_for(self, root, checkpoint_path, per_step: bool, sharding=None) -> FeatureStore:
        path = str(checkpoint_path)
        # A checkpoint that is no file (custom loader) is identified by its name alone.
        digest = (
            file_sha256(path) if os.path.isfile(path) else hashlib.sha256(path.encode()).hexdigest()
        )
        layout = "per_step" if per_step else "summed"
        identity = {
            **self._identity,
            "params": [b.name for b in self._featurizer.blocks],
            "widths": [b.columns.stop - b.columns.start for b in self._featurizer.blocks],
            "checkpoint": {"file": Path(path).name, "sha256": digest},
            "layout": layout,
            "dtype": "float32",
            "sdi_version": __version__,
        }
        folder = Path(root) / f"{digest[:16]}-{layout}"
        if sharding is not None:  # one folder per rank, each resumed by its rank
            identity["shard"] = sharding.identity
            folder = folder / sharding.folder
        return FeatureStore(folder, identity)

    def _train_stream(
        self, loader, loss_fn, *, per_step: bool, store: FeatureStore | None, bar, sharding=None
    ):
        """A callable giving ``(row offset, features, steps)`` per train batch, computed or stored.

        Sharded, only this rank's batches, with row offsets counted over them.
        """
        device = self._featurizer.device
        if sharding is not None:
            loader = sharding.owned(loader)

        def compute(batch):  # None: the batch is not there (a corrupt shard cannot be rebuilt)
            if batch is None:
                return None
            return self._featurizer.compute_batch(batch, loss_fn, sum_steps=not per_step)

        def recompute(i):  # a corrupt shard of a complete store: from its batch, if unchanged
            batch = batch_at(loader, i)
            if batch is not None:
                store.check_fingerprint(i, batch_fingerprint(batch))
            return compute(batch)

        def stored():
            if store.complete:
                for i, shard in enumerate(store.shards):
                    redo = lambda i=i: recompute(i)  # noqa: E731
                    yield store.read(i, device, recompute=redo), shard["steps"]
                return
            n = 0
            for n, batch in enumerate(loader, 1):
                i, fingerprint = n - 1, batch_fingerprint(batch)
                if i < len(store.shards):  # written before an interruption: read, don't recompute
                    store.check_fingerprint(i, fingerprint)
                    feats = store.read(i, device, recompute=lambda b=batch: compute(b))
                    yield feats, store.shards[i]["steps"]
                    continue
                feats, steps = compute(batch)
                store.append(feats, steps, fingerprint=fingerprint)
                bar.update(1)
                yield feats, steps
            store.finish(n, allow_empty=sharding is not None)  # a rank may own no batch

        def stream():
            offset, counts = 0, []
            batches = (
                self._batches(loader, loss_fn, per_step=per_step, bar=bar)
                if store is None
                else stored()
            )
            for feats, steps in batches:
                yield offset, feats, steps
                offset += feats.shape[0]
                counts.append(feats.shape[0])
            if sharding is not None:
                sharding.counts = counts  # a rank may own no batch: the gather checks the whole set
            elif offset == 0:
                raise ValueError("train_loader yielded no batches")

        return stream

    def _passes(
        self,
        *,
        checkpoints,
        train_loader,
        query_loader,
        loss_fn,
        per_step_train: bool,
        per_step_query: bool,
        load_checkpoint_fn,
        load_model_state_dict_fn,
        eta_from_checkpoint_fn,
        progress: bool,
        progress_desc: str,
        max_query_bytes: int,
        train_store,
        sharding=None,
    ) -> Iterator[tuple[float, Iterator[Pair]]]:
        """Per checkpoint: load it, then yield ``(eta_k, pairs)``; see :data:`Pair`.

        Sharded, the pairs hold only this rank's train batches, and an error raised here or while
        producing the pairs is reported to the other ranks before it propagates.
        """
        checkpoints = as_checkpoint_specs(checkpoints)
        if max_query_bytes <= 0:
            raise ValueError(f"max_query_bytes must be positive, got {max_query_bytes}")
        _warn_if_shuffled(train_loader, "train_loader")
        _warn_if_shuffled(query_loader, "query_loader")
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
                store = (
                    None
                    if train_store is None
                    else self._store_for(train_store, spec.path, per_step_train, sharding)
                )
                with tqdm(
                    desc="train batches", unit="batch", leave=False, disable=not progress
                ) as bar:
                    stream = self._train_stream(
                        train_loader,
                        loss_fn,
                        per_step=per_step_train,
                        store=store,
                        bar=bar,
                        sharding=sharding,
                    )
                    chunks = self._query_chunks(
                        query_loader, loss_fn, per_step=per_step_query, max_bytes=max_query_bytes
                    )
                    pairs = (
                        (j0, query, r0, feats, steps)
                        for j0, query in chunks
                        for r0, feats, steps in stream()
                    )
                    yield weight, (pairs if sharding is None else sharding.reporting(pairs))
        except Exception as err:
            if sharding is not None:
                sharding.fail(err)  # the other ranks raise too, instead of waiting for this one
            raise
        finally:
            self.model.train(was_training)

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
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
        train_store: str | Path | None = None,
        gather_to: distributed.GatherTo = 0,
        with_standard_errors: bool = False,
    ) -> InfluenceOutputs | None:
        """SDI and TracIn summed over checkpoints with weights ``eta_k``.

        For each checkpoint: load it (``load_checkpoint_fn``), load the model
        (``load_model_state_dict_fn``), switch to eval mode, featurise the query set, then stream
        the train set. Returns :class:`InfluenceOutputs` with ``sdi (N_train, N_query, steps_q)``
        (``None`` in ``mode="tracin"``), ``tracin (N_train, N_query)`` and, with
        ``with_step_matrix=True``, ``sdi_matrix (N_train, N_query, steps_tr, steps_q)``. Rows follow
        the train loader's order, columns the query loader's.

        Args beyond the reference's:
            max_query_bytes: the most query-feature memory held at once. A larger query set is
                processed in chunks, each with its own pass over the train set: less memory, more
                time (the train set is featurised once per chunk unless ``train_store`` is set).
            train_store: a folder for train features (:mod:`sdi.store`): written on the first run,
                read by later runs with other query sets, resumed after an interruption.
            gather_to: under ``torch.distributed`` with several processes (:mod:`sdi.distributed`),
                the rank that receives the rows of every rank (the others get ``None``), ``"all"``,
                or ``None`` for each rank's own rows (train batches ``rank``, ``rank + world``, ...).
                Ignored by a single process.
            with_standard_errors: also return ``sdi_se`` and ``tracin_se``, a standard error per
                score estimated from the sketches alone (:mod:`sdi.uncertainty`). Over several
                checkpoints they add as ``sum_k |eta_k| SE_k``: the tables are shared, so the
                checkpoints' errors are correlated and this is an upper bound (exact for one).
        The chunk sizes bound the temporaries of one contraction.
        """
        if mode not in ("sdi", "tracin"):
            raise ValueError(f"mode must be 'sdi' or 'tracin', got {mode!r}")
        if with_step_matrix and mode != "sdi":
            raise ValueError("with_step_matrix=True needs mode='sdi'")
        if with_standard_errors and self._featurizer.rules.exact:
            raise ValueError(
                "with_standard_errors=True is for sketched estimates; exact ones have none"
            )
        chunks = (train_chunk_size, query_chunk_size)
        columns = [b.columns for b in self._featurizer.blocks]
        sharding = distributed.sharding_of(train_loader, self._featurizer.device, gather_to)
        totals: dict[str, torch.Tensor] | None = None
        for weight, pairs in self._passes(
            checkpoints=checkpoints,
            train_loader=train_loader,
            query_loader=query_loader,
            loss_fn=loss_fn,
            per_step_train=with_step_matrix,
            per_step_query=mode == "sdi",
            load_checkpoint_fn=load_checkpoint_fn,
            load_model_state_dict_fn=load_model_state_dict_fn,
            eta_from_checkpoint_fn=eta_from_checkpoint_fn,
            progress=progress,
            progress_desc=progress_desc,
            max_query_bytes=max_query_bytes,
            train_store=train_store,
            sharding=sharding,
        ):
            blocks: dict[str, dict[int, list[torch.Tensor]]] = {}  # output -> column offset -> rows
            train_steps = set()
            errors = None  # (column offset, SketchErrors of that query chunk)
            for j0, query, _, feats, steps in pairs:
                if with_step_matrix:
                    train_steps.add(steps)
                    if len(train_steps) > 1:
                        raise ValueError(
                            f"train batches have different step counts: {sorted(train_steps)}"
                        )
                    _put(blocks, j0, "sdi_matrix", influence.step_matrix(feats, query, *chunks))
                    feats = feats.sum(dim=1)
                if mode == "sdi":
                    _put(blocks, j0, "sdi", influence.query_sdi(feats, query, *chunks))
                else:
                    _put(blocks, j0, "tracin", influence.tracin(feats, query, *chunks))
                if with_standard_errors:
                    if errors is None or errors[0] != j0:
                        per_step = query if mode == "sdi" else query[:, None]
                        errors = (
                            j0,
                            uncertainty.SketchErrors(per_step, columns, self._featurizer.rules.m),
                        )
                    sdi_se, tracin_se = errors[1](feats, *chunks)
                    if mode == "sdi":
                        _put(blocks, j0, "sdi_se", sdi_se)
                    _put(blocks, j0, "tracin_se", tracin_se)
            result = {
                key: torch.cat([torch.cat(cols[j0]) for j0 in sorted(cols)], dim=1)
                for key, cols in blocks.items()
            }
            totals = _accumulate(totals, result, weight)
        if sharding is not None:
            totals = sharding.gather(totals)
            if totals is None:
                return None
        errors = dict(sdi_se=totals.get("sdi_se"), tracin_se=totals.get("tracin_se"))
        if mode == "tracin":
            return InfluenceOutputs(sdi=None, tracin=totals["tracin"], **errors)
        return InfluenceOutputs(
            sdi=totals["sdi"],
            tracin=totals["sdi"].sum(dim=2),
            sdi_matrix=totals.get("sdi_matrix"),
            **errors,
        )

    def top_influences(
        self,
        *,
        k: int,
        checkpoints: Sequence[CheckpointSpec],
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        loss_fn: LossFn,
        load_checkpoint_fn: Callable[[str | Path], dict[str, Any]] = default_load_checkpoint,
        load_model_state_dict_fn: Callable[
            [nn.Module, dict[str, Any]], None
        ] = default_load_model_state_dict,
        eta_from_checkpoint_fn: Callable[[dict[str, Any]], float] = default_eta_from_checkpoint,
        progress: bool = False,
        progress_desc: str = "checkpoints",
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
        train_store: str | Path | None = None,
        gather_to: distributed.GatherTo = 0,
    ) -> TopInfluences | None:
        """The ``k`` most and least influential train examples per query, with SDI trajectories.

        Never forms the dense ``(N_train, N_query, steps)`` SDI: a first pass computes TracIn
        ``(N_train, N_query)`` (fast mode) and ranks it; a second pass computes SDI only for the
        selected (train, query) pairs. Pass ``train_store`` to featurise the train set once for both.
        Sharded over processes, each rank ranks and traces its own rows and the ranks' top ``k``
        are merged on ``gather_to`` (a rank or ``"all"``; the others get ``None``). Other arguments
        as in :meth:`influence_across_checkpoints`.
        """
        if int(k) <= 0:
            raise ValueError(f"k must be positive, got {k}")
        common = dict(
            checkpoints=checkpoints,
            train_loader=train_loader,
            query_loader=query_loader,
            loss_fn=loss_fn,
            load_checkpoint_fn=load_checkpoint_fn,
            load_model_state_dict_fn=load_model_state_dict_fn,
            eta_from_checkpoint_fn=eta_from_checkpoint_fn,
            progress=progress,
            progress_desc=progress_desc,
            max_query_bytes=max_query_bytes,
            train_store=train_store,
        )
        sharding = distributed.sharding_of(train_loader, self._featurizer.device, gather_to)
        if sharding is not None and gather_to is None:
            raise ValueError("top_influences needs gather_to to be a rank or 'all'")
        # Sharded: this rank's rows only; the best of each rank's best are merged at the end.
        tracin = self.influence_across_checkpoints(mode="tracin", gather_to=None, **common).tracin
        n_train = tracin.shape[0] if sharding is None else sharding.total(tracin.shape[0])
        if k > n_train:
            warnings.warn(
                f"k={k} exceeds the {n_train} train examples; returning all of them", stacklevel=2
            )
            k = n_train
        local_k = min(k, tracin.shape[0])
        most = tracin.topk(local_k, dim=0)
        least = tracin.topk(local_k, dim=0, largest=False)
        chosen = torch.cat([most.indices, least.indices]).T.contiguous()  # (N_query, 2 local_k)
        trajectories = None
        for weight, pairs in self._passes(
            per_step_train=False, per_step_query=True, sharding=sharding, **common
        ):
            for j0, query, r0, feats, _ in pairs:
                rows = chosen[j0 : j0 + query.shape[0]] - r0
                hit = (rows >= 0) & (rows < feats.shape[0])
                if not hit.any():
                    continue
                if trajectories is None:
                    trajectories = torch.zeros(*chosen.shape, query.shape[1], device=query.device)
                j, p = hit.nonzero(as_tuple=True)
                block = influence.query_sdi(feats, query)  # (b, n_query_chunk, steps)
                trajectories[j0 + j, p] += weight * block[rows[j, p], j]
        top = dict(
            most_indices=most.indices.T,
            most_tracin=most.values.T,
            least_indices=least.indices.T,
            least_tracin=least.values.T,
        )
        if trajectories is not None:  # None only on a rank that owns no train batch
            top.update(most_sdi=trajectories[:, :local_k], least_sdi=trajectories[:, local_k:])
        if sharding is not None:
            top = sharding.merge_top(top, k)
            if top is None:
                return None
        return TopInfluences(**top)


def _put(blocks: dict, j0: int, key: str, rows: torch.Tensor) -> None:
    """File one train batch's rows of output ``key`` under query chunk ``j0``."""
    blocks.setdefault(key, {}).setdefault(j0, []).append(rows)


def _accumulate(totals, result: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """Add ``weight`` times one checkpoint's outputs to the running totals (``|weight|`` times
    for standard errors, which add as an upper bound: see ``with_standard_errors``)."""
    result = {
        key: value.mul_(abs(weight) if key.endswith("_se") else weight)
        for key, value in result.items()
    }
    if totals is None:
        return result
    for key, value in result.items():
        if value.shape != totals[key].shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} at this checkpoint but {tuple(totals[key].shape)} "
                "before: the loaders must yield the same examples at every checkpoint"
            )
        totals[key].add_(value)
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
        strict: refuse what has no per-example gradient: modules whose forward changes their
            buffers, and forwards the generic rule's per-example recompute does not reproduce.
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
        self._identity = {
            "estimator": "projected",
            "seed": int(seed),
            "projection_size": int(projection_size),
        }
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
        self._identity = {"estimator": "exact"}
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
