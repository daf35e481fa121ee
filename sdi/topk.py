"""Top-k: the most and least influential train examples per query, with their SDI trajectories.

Never forms the dense ``(N_train, N_query, steps)`` SDI: a first pass computes TracIn
``(N_train, N_query)`` (:func:`sdi.influence.influence_across_checkpoints` in fast mode) and ranks
it; a second pass computes SDI only for the selected (train, query) pairs. Sharded over processes,
each rank ranks and traces its own rows and the ranks' top ``k`` are merged at the end
(:meth:`sdi.distributed.Sharding.merge_top`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.distributed as dist

from . import distributed, influence
from .featurize import Featurizer
from .options import RunOptions
from .outputs import TopInfluences
from .passes import checkpoint_passes
from .validation import check_int, warn_outside_package


def top_influences(
    featurizer: Featurizer, options: RunOptions, k: int, *, estimator: dict
) -> TopInfluences | None:
    """The stage behind :meth:`sdi.estimators.ProjectedTracInSDI.top_influences` (``estimator``
    as in :func:`sdi.passes.checkpoint_passes`; ``options.mode`` and the options of the dense
    outputs are not used).

    A NaN or infinite TracIn score is never ranked: where fewer than ``k`` scores of a query are
    finite, its lists end with index ``-1`` and NaN scores (see :class:`TopInfluences`).
    Returns ``None`` on the ranks that do not receive the merged result.
    """
    k = check_int("k", k, minimum=1)  # before any work: k=2.5 must not cost a TracIn pass
    sharding = distributed.sharding_of(options.train_loader, featurizer.device, options.gather_to)
    sharding.require_receiver("top_influences")
    # Sharded: this rank's rows only; the best of each rank's best are merged at the end.
    this_rank = dataclasses.replace(options, mode="tracin", gather_to=None)
    tracin = influence.influence_across_checkpoints(
        featurizer, this_rank, estimator=estimator
    ).tracin
    n_train = sharding.total(tracin.shape[0])
    if k > n_train:
        warnings.warn(
            f"k={k} exceeds the {n_train} train examples; returning all of them", stacklevel=3
        )
        k = n_train
    local_k = min(k, tracin.shape[0])
    finite = torch.isfinite(tracin)
    excluded = _summed(sharding, (~finite).sum(dim=0))  # (N_query,) over every rank's rows
    # A non-finite score ranks last on both sides; it is masked out of the result below.
    most = tracin.where(finite, -torch.inf).topk(local_k, dim=0)
    least = tracin.where(finite, torch.inf).topk(local_k, dim=0, largest=False)
    chosen = torch.cat([most.indices, least.indices]).T.contiguous()  # (N_query, 2 local_k)
    trajectories = None
    counts: list[int] = []
    for checkpoint in checkpoint_passes(
        featurizer,
        options,
        sharding,
        per_step_train=False,
        per_step_query=True,
        estimator=estimator,
    ):
        for j0, query, r0, feats, _ in checkpoint.pairs:
            rows = chosen[j0 : j0 + query.shape[0]] - r0
            hit = (rows >= 0) & (rows < feats.shape[0])
            if not hit.any():
                continue
            if trajectories is None:
                trajectories = torch.zeros(*chosen.shape, query.shape[1], device=query.device)
            j, p = hit.nonzero(as_tuple=True)
            block = influence.query_sdi(feats, query)  # (b, n_query_chunk, steps)
            trajectories[j0 + j, p] += checkpoint.weight * block[rows[j, p], j]
        counts = checkpoint.train.counts
    top = dict(
        most_indices=most.indices.T,
        most_tracin=most.values.T,
        least_indices=least.indices.T,
        least_tracin=least.values.T,
    )
    if trajectories is not None:  # None only on a rank that owns no train batch
        top.update(most_sdi=trajectories[:, :local_k], least_sdi=trajectories[:, local_k:])
    top = sharding.merge_top(top, k, counts)
    if top is None:
        return None
    if excluded.any():
        _warn_excluded(excluded)
        for side in ("most", "least"):
            _mask_excluded(top, side)
    return TopInfluences(**top, n_excluded=excluded)


def _summed(sharding, counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over the ranks (itself in one process)."""
    if sharding.world == 1:
        return counts
    total = counts.to(sharding.comm)
    dist.all_reduce(total)
    return total.to(counts.device)


def _mask_excluded(top: dict[str, torch.Tensor], side: str) -> None:
    """Mark the slots that only a non-finite score filled: index -1, NaN TracIn and SDI."""
    empty = ~torch.isfinite(top[f"{side}_tracin"])  # ranked scores are finite, masked ones not
    top[f"{side}_indices"] = top[f"{side}_indices"].masked_fill(empty, -1)
    top[f"{side}_tracin"] = top[f"{side}_tracin"].masked_fill(empty, torch.nan)
    top[f"{side}_sdi"] = top[f"{side}_sdi"].masked_fill(empty[..., None], torch.nan)


def _warn_excluded(excluded: torch.Tensor) -> None:
    queries = excluded.nonzero().flatten().tolist()
    more = f" and {len(queries) - 10} more" if len(queries) > 10 else ""
    warn_outside_package(
        f"top_influences: {int(excluded.sum())} TracIn scores are NaN or infinite and were not "
        f"ranked (queries {queries[:10]}{more}; per query in n_excluded). Where fewer than k "
        "scores of a query are finite, its lists end with index -1 and NaN scores."
    )
