"""The public estimators: projected (sketched) and exact TracIn / SDI, drop-in for
``step-decomposed-influence`` 0.1.1.

This module holds the public surface only: each method keeps the keyword list of 0.1.1 (plus the
optional keywords added since), gathers it into one :class:`sdi.options.RunOptions` and runs the
stages:

- :mod:`sdi.passes`: the checkpoint loop -- load each checkpoint, featurise the query set in chunks
  (:mod:`sdi.loaders`), stream the train set (:mod:`sdi.train_stream`: computed, or stored and
  resumed with ``train_store=``, :mod:`sdi.store`), and pair every query chunk with every batch;
- :mod:`sdi.influence`: the contraction of each pair and the output assembly;
- :mod:`sdi.topk`: top-k from a TracIn pass and a second pass over the selected pairs.

Under ``torch.distributed`` the train batches are split over the ranks (:mod:`sdi.distributed`);
each call runs inside :func:`sdi.distributed.failures_shared`, so an error on one rank reaches the
others at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from . import auto_core, distributed, influence, loaders, topk
from .backend import get_backend
from .checkpoints import (
    CheckpointSpec,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from .explain import explain as explain_pairs
from .featurize import Featurizer, LossFn
from .options import DEFAULT_MAX_QUERY_BYTES, RunOptions
from .outputs import FeatureSet, InfluenceOutputs, PairExplanation, TopInfluences
from .steps import StepPlan
from .validation import check_int, check_seed


class _Estimator:
    """The public methods shared by both estimators (``self._featurizer`` set by each)."""

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
        """Remove every hook from the model; the estimator cannot be used afterwards."""
        self._featurizer.close()

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
        self._featurizer = auto_core.resolved(self._featurizer, loader, loss_fn, "loader")
        self._featurizer.start_call()
        with distributed.failures_shared(self._featurizer.device):
            return loaders.featurize_loader(
                self._featurizer, loader, loss_fn, gather_to, estimator=self._identity
            )

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
        by_parameter: bool | Mapping[str, str] = False,
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
            by_parameter: also return ``sdi_by_parameter`` (``tracin_by_parameter`` in
                ``mode="tracin"``), ``{group: share}`` shaped like ``sdi`` / ``tracin`` and adding
                up to it to float rounding. ``True``: one group per selected parameter (named as in
                ``model.named_parameters()``); ``{group: regex}``: a parameter joins the first group
                (dict order) whose regex ``re.search``-es its name, unmatched ones ``"other"``; a
                group left empty is refused (:mod:`sdi.parameter_groups`).
        The chunk sizes bound the temporaries of one contraction.
        """
        with distributed.failures_shared(self._featurizer.device):
            options = _options(locals())  # first: locals() are the call's arguments alone
            self._featurizer = auto_core.resolved(
                self._featurizer, query_loader, loss_fn, "query_loader"
            )
            self._featurizer.start_call()
            return influence.influence_across_checkpoints(
                self._featurizer, options, estimator=self._identity
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
        explain: bool | Mapping[str, str] = False,
    ) -> TopInfluences | None:
        """The ``k`` most and least influential train examples per query, with SDI trajectories.

        Never forms the dense ``(N_train, N_query, steps)`` SDI: a first pass computes TracIn
        ``(N_train, N_query)`` (fast mode) and ranks it; a second pass computes SDI only for the
        selected (train, query) pairs. Pass ``train_store`` to featurise the train set once for both.
        Sharded over processes, each rank ranks and traces its own rows and the ranks' top ``k``
        are merged on ``gather_to`` (a rank or ``"all"``; the others get ``None``). Other arguments
        as in :meth:`influence_across_checkpoints`.

        ``explain=True`` (or ``{group: regex}``, the groups of ``by_parameter``) also explains every
        returned pair (:meth:`explain`): ``most_explanations`` / ``least_explanations``, per query
        a list of :class:`PairExplanation` in the order of ``*_indices``. It costs ``1 + T``
        featurisations of each batch holding a selected example, on the receiving rank.
        """
        with distributed.failures_shared(self._featurizer.device):
            options = _options(locals(), skip=("k", "explain"))  # first: locals() = the arguments
            self._featurizer = auto_core.resolved(
                self._featurizer, query_loader, loss_fn, "query_loader"
            )
            self._featurizer.start_call()
            top = topk.top_influences(self._featurizer, options, k, estimator=self._identity)
        # Outside the shared-failure scope: only the receiving rank(s) explain, in one process.
        if top is None or explain is False or explain is None:
            return top
        ranked = {"most": top.most_indices.tolist(), "least": top.least_indices.tolist()}
        pairs = [(i, j) for rows in ranked.values() for j, row in enumerate(rows) for i in row]
        grouped = dataclasses.replace(options, by_parameter=explain)
        found = dict(zip(pairs, explain_pairs(self._featurizer, grouped, pairs), strict=True))
        return dataclasses.replace(
            top,
            **{
                f"{side}_explanations": [[found[(i, j)] for i in row] for j, row in enumerate(rows)]
                for side, rows in ranked.items()
            },
        )

    def explain(
        self,
        *,
        pairs: Sequence[tuple[int, int]],
        checkpoints: Sequence[CheckpointSpec],
        train_loader: Iterable[Any],
        query_loader: Iterable[Any],
        loss_fn: LossFn,
        by_parameter: bool | Mapping[str, str] = True,
        load_checkpoint_fn: Callable[[str | Path], dict[str, Any]] = default_load_checkpoint,
        load_model_state_dict_fn: Callable[
            [nn.Module, dict[str, Any]], None
        ] = default_load_model_state_dict,
        eta_from_checkpoint_fn: Callable[[dict[str, Any]], float] = default_eta_from_checkpoint,
        progress: bool = False,
        progress_desc: str = "checkpoints",
    ) -> list[PairExplanation]:
        """Where in the sequences and through which weights the SDI of each ``(train row, query
        row)`` of ``pairs`` came from: one :class:`PairExplanation` per pair, in order, with
        ``positions_train (T_i, steps_q)``, ``positions_query (T_j, steps_q)`` and
        ``by_parameter (groups, steps_q)`` (groups as in :meth:`influence_across_checkpoints`),
        each summing over its first axis to the pair's SDI (see :mod:`sdi.explain`).

        Cost grows with the pairs, not the data: only the batches holding an explained example are
        featurised, ``1 + T`` times each (``T`` their positions). One process computes it all
        (no sharding). Other arguments as in :meth:`influence_across_checkpoints`.
        """
        options = _options(locals(), skip="pairs")  # first: locals() are the arguments alone
        self._featurizer = auto_core.resolved(
            self._featurizer, query_loader, loss_fn, "query_loader"
        )
        self._featurizer.start_call()
        return explain_pairs(self._featurizer, options, pairs)


def _options(arguments: dict[str, Any], skip: str | tuple[str, ...] = ()) -> RunOptions:
    """The :class:`RunOptions` of a public method's keyword arguments (its ``locals()`` on entry,
    less ``self`` and ``skip``): the signature spells the keywords out, this passes them on."""
    skip = (skip,) if isinstance(skip, str) else skip
    return RunOptions(**{k: v for k, v in arguments.items() if k != "self" and k not in skip})


class ProjectedTracInSDI(_Estimator):
    """Projected TracIn and SDI: per-example gradients sketched during backward, never materialised.

    ``nn.Linear.weight`` and ``nn.Embedding.weight`` are TensorSketched, ``nn.Linear.bias`` and other
    1-D parameters (norm layers, via Opacus' per-sample rules) CountSketched, all into
    ``projection_size`` buckets per parameter with hash tables drawn from ``seed``. The kernels come
    from ``SDI_BACKEND`` (see :mod:`sdi.backend`).

    Args:
        model: the whole model; ``loss_fn(model, batch)`` runs it.
        target_modules: the module(s) whose trainable parameters are analysed -- for a looped model,
            the recurrent core, so that its ``steps`` uses become the SDI steps. ``"auto"``: found
            from the first batch of the first call with data (:mod:`sdi.auto_core`: the outermost
            parameter-owning modules that run more than once per forward pass), printed with
            its step plan; several loops run different numbers of times are an error that lists them.
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
        target_modules: nn.Module | Sequence[nn.Module] | str,
        projection_size: int = 2048,
        seed: int = 0,
        loss_reduction: str = "sum",
        batch_first: bool = True,
        expected_steps: int | None = None,
        allow_mixed_steps: bool = False,
        strict: bool = True,
    ) -> None:
        projection_size = check_int("projection_size", projection_size, minimum=1)
        seed = check_seed(seed)
        self._identity = {
            "estimator": "projected",
            "seed": seed,
            "projection_size": projection_size,
        }
        self._featurizer = auto_core.featurizer_for(
            model=model,
            target_modules=target_modules,
            projection_size=projection_size,
            seed=seed,
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
        target_modules: nn.Module | Sequence[nn.Module] | str,
        loss_reduction: str = "sum",
        batch_first: bool = True,
        expected_steps: int | None = None,
        allow_mixed_steps: bool = False,
        strict: bool = True,
    ) -> None:
        self._identity = {"estimator": "exact"}
        self._featurizer = auto_core.featurizer_for(
            model=model,
            target_modules=target_modules,
            projection_size=None,
            loss_reduction=loss_reduction,
            batch_first=batch_first,
            expected_steps=expected_steps,
            allow_mixed_steps=allow_mixed_steps,
            strict=strict,
        )
