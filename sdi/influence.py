"""Contractions of train and query features into influence scores.

Features are flat fp32 tensors whose last dimension ``D`` concatenates every selected parameter, so
``sum_p <x_p, y_p>`` is one inner product. With ``g_i = sum_s phi_s(train i)``:

- ``sdi[i, j, t]      = <g_i, phi_t(query j)>``                  (N_train, N_query, steps_q)
- ``tracin[i, j]      = <g_i, sum_t phi_t(query j)>``            (N_train, N_query)
- ``matrix[i, j, s, t] = <phi_s(train i), phi_t(query j)>``      (N_train, N_query, steps_tr, steps_q)

Each takes optional chunk sizes that bound the temporaries of one matmul.

:func:`influence_across_checkpoints` runs them over the pairs of every checkpoint's pass
(:mod:`sdi.passes`): :func:`checkpoint_scores` files each pair's rows by output and query chunk,
:func:`accumulate` adds the checkpoints with their weights, and :func:`assemble` builds the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch

from . import distributed, uncertainty
from .chunking import tiles
from .featurize import Featurizer
from .options import RunOptions
from .outputs import InfluenceOutputs
from .parameter_groups import ParameterGroup, parameter_groups
from .passes import Pair, checkpoint_passes

BY_PARAMETER = "_by_parameter/"  # key prefix of a group's share: "sdi_by_parameter/<group>"


def query_sdi(
    train_sum: torch.Tensor,
    query: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train_sum (n, D)``, ``query (N_q, S_q, D)`` -> ``(n, N_q, S_q)``."""
    n, (nq, sq, _) = train_sum.shape[0], query.shape
    out = torch.empty(n, nq, sq, dtype=torch.float32, device=query.device)
    for i, j in tiles(n, nq, train_chunk, query_chunk):
        q = query[j].reshape(-1, query.shape[-1])
        out[i, j] = (train_sum[i] @ q.T).view(i.stop - i.start, j.stop - j.start, sq)
    return out


def tracin(
    train_sum: torch.Tensor,
    query_sum: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train_sum (n, D)``, ``query_sum (N_q, D)`` -> ``(n, N_q)``."""
    out = torch.empty(
        train_sum.shape[0], query_sum.shape[0], dtype=torch.float32, device=query_sum.device
    )
    for i, j in tiles(train_sum.shape[0], query_sum.shape[0], train_chunk, query_chunk):
        out[i, j] = train_sum[i] @ query_sum[j].T
    return out


def step_matrix(
    train: torch.Tensor,
    query: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train (n, S_tr, D)``, ``query (N_q, S_q, D)`` -> ``(n, N_q, S_tr, S_q)``."""
    (n, st, d), (nq, sq, _) = train.shape, query.shape
    out = torch.empty(n, nq, st, sq, dtype=torch.float32, device=query.device)
    for i, j in tiles(n, nq, train_chunk, query_chunk):
        prod = train[i].reshape(-1, d) @ query[j].reshape(-1, d).T
        out[i, j] = prod.view(i.stop - i.start, st, j.stop - j.start, sq).permute(0, 2, 1, 3)
    return out


def influence_across_checkpoints(
    featurizer: Featurizer, options: RunOptions, *, estimator: dict
) -> InfluenceOutputs | None:
    """SDI and TracIn summed over ``options.checkpoints``, gathered to ``options.gather_to``.

    The stage behind :meth:`sdi.estimators.ProjectedTracInSDI.influence_across_checkpoints`;
    ``estimator`` as in :func:`sdi.passes.checkpoint_passes`.
    """
    if options.with_standard_errors and featurizer.rules.exact:
        raise ValueError(
            "with_standard_errors=True is for sketched estimates; exact ones have none: use "
            "ProjectedTracInSDI, or drop with_standard_errors"
        )
    sharding = distributed.sharding_of(options.train_loader, featurizer.device, options.gather_to)
    errors_of = None
    if options.with_standard_errors:
        columns = [b.columns for b in featurizer.blocks]
        errors_of = partial(uncertainty.SketchErrors, columns=columns, m=featurizer.rules.m)
    groups = None
    if options.by_parameter not in (False, None):
        groups = parameter_groups(featurizer.blocks, options.by_parameter)
    totals: dict[str, torch.Tensor] | None = None
    counts: list[int] = []
    for checkpoint in checkpoint_passes(
        featurizer,
        options,
        sharding,
        per_step_train=options.with_step_matrix,
        per_step_query=options.mode == "sdi",
        estimator=estimator,
    ):
        scores = checkpoint_scores(checkpoint.pairs, options, errors_of, groups)
        totals = accumulate(totals, scores, checkpoint.weight)
        counts = checkpoint.train.counts
    totals = sharding.gather(totals, counts)
    return None if totals is None else assemble(totals, options.mode)


def checkpoint_scores(
    pairs: Iterable[Pair],
    options: RunOptions,
    errors_of: Callable[[torch.Tensor], uncertainty.SketchErrors] | None = None,
    groups: Sequence[ParameterGroup] | None = None,
) -> dict[str, torch.Tensor]:
    """One checkpoint's outputs from its pairs: ``{"sdi" or "tracin", ["sdi_matrix"], [*_se],
    ["sdi_by_parameter/<group>" or "tracin_by_parameter/<group>"]}``, each
    ``(n_train, N_query, ...)`` (this rank's train rows).

    ``groups`` (:func:`sdi.parameter_groups.parameter_groups`) adds each group's share: the same
    contraction restricted to the group's columns.

    ``errors_of(query)`` builds the :class:`sdi.uncertainty.SketchErrors` of a query chunk (given
    for ``with_standard_errors``); the query is per-step in ``mode="sdi"``, summed otherwise.
    """
    sdi = options.mode == "sdi"
    blocks: dict[str, dict[int, list[torch.Tensor]]] = {}  # output -> column offset -> rows
    train_steps = set()
    errors = None  # (column offset, SketchErrors of that query chunk)
    for j0, query, _, feats, steps in pairs:
        if options.with_step_matrix:
            train_steps.add(steps)
            if len(train_steps) > 1:
                raise ValueError(
                    f"train batches have different step counts {sorted(train_steps)} (a "
                    "data-dependent loop?): with_step_matrix needs one step count; pass "
                    "expected_steps= to check it, or drop with_step_matrix"
                )
            _put(blocks, j0, "sdi_matrix", step_matrix(feats, query, *options.chunks))
            feats = feats.sum(dim=1)
        contract = query_sdi if sdi else tracin
        key = "sdi" if sdi else "tracin"
        _put(blocks, j0, key, contract(feats, query, *options.chunks))
        for group in groups or ():
            share = contract(group.select(feats), group.select(query), *options.chunks)
            _put(blocks, j0, f"{key}{BY_PARAMETER}{group.name}", share)
        if errors_of is not None:
            if errors is None or errors[0] != j0:
                errors = (j0, errors_of(query if sdi else query[:, None]))
            sdi_se, tracin_se = errors[1](feats, *options.chunks)
            if sdi:
                _put(blocks, j0, "sdi_se", sdi_se)
            _put(blocks, j0, "tracin_se", tracin_se)
    return {
        key: torch.cat([torch.cat(cols[j0]) for j0 in sorted(cols)], dim=1)
        for key, cols in blocks.items()
    }


def _put(blocks: dict, j0: int, key: str, rows: torch.Tensor) -> None:
    """File one train batch's rows of output ``key`` under query chunk ``j0``."""
    blocks.setdefault(key, {}).setdefault(j0, []).append(rows)


def accumulate(
    totals: dict[str, torch.Tensor] | None, scores: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """Add ``weight`` times one checkpoint's outputs to the running totals (``|weight|`` times
    for standard errors, which add as an upper bound: see ``with_standard_errors``)."""
    scores = {
        key: value.mul_(abs(weight) if key.endswith("_se") else weight)
        for key, value in scores.items()
    }
    if totals is None:
        return scores
    for key, value in scores.items():
        if value.shape != totals[key].shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} at this checkpoint but {tuple(totals[key].shape)} "
                "before: the loaders must yield the same examples at every checkpoint"
            )
        totals[key].add_(value)
    return totals


def assemble(totals: dict[str, torch.Tensor], mode: str) -> InfluenceOutputs:
    """The :class:`InfluenceOutputs` of summed ``totals`` (TracIn of SDI is its sum over steps)."""
    errors = dict(sdi_se=totals.get("sdi_se"), tracin_se=totals.get("tracin_se"))
    key = "sdi" if mode == "sdi" else "tracin"
    prefix = key + BY_PARAMETER
    shares = {k[len(prefix) :]: v for k, v in totals.items() if k.startswith(prefix)} or None
    if mode == "tracin":
        return InfluenceOutputs(
            sdi=None, tracin=totals["tracin"], tracin_by_parameter=shares, **errors
        )
    return InfluenceOutputs(
        sdi=totals["sdi"],
        tracin=totals["sdi"].sum(dim=2),
        sdi_matrix=totals.get("sdi_matrix"),
        sdi_by_parameter=shares,
        **errors,
    )
