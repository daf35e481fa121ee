"""The result types the estimators return: influence scores, top-k lists and feature sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InfluenceOutputs:
    """Influence summed over checkpoints (fp32).

    - ``sdi``: ``(N_train, N_query, steps_query)``, or ``None`` in ``mode="tracin"``
    - ``tracin``: ``(N_train, N_query)``
    - ``sdi_matrix``: ``(N_train, N_query, steps_train, steps_query)`` when asked for
    - ``sdi_se``, ``tracin_se``: standard errors of ``sdi`` and ``tracin``, shaped like them, with
      ``with_standard_errors=True`` (projected estimator)
    """

    sdi: torch.Tensor | None
    tracin: torch.Tensor
    sdi_matrix: torch.Tensor | None = None
    sdi_se: torch.Tensor | None = None
    tracin_se: torch.Tensor | None = None


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most and ``k`` least influential train examples for each query.

    Row ``j`` belongs to query ``j`` (query loader order); indices are rows of the train loader.
    ``*_indices (N_query, k)`` int64, ``*_tracin (N_query, k)``, ``*_sdi (N_query, k, steps_query)``;
    ``most_*`` sorted by decreasing TracIn, ``least_*`` by increasing TracIn.

    A NaN or infinite TracIn score is never ranked: ``n_excluded (N_query,)`` int64 counts them
    per query (``None`` when built by hand). Where fewer than ``k`` scores of a query are finite,
    its lists end with index ``-1`` and NaN TracIn and SDI.
    """

    most_indices: torch.Tensor
    most_tracin: torch.Tensor
    most_sdi: torch.Tensor
    least_indices: torch.Tensor
    least_tracin: torch.Tensor
    least_sdi: torch.Tensor
    n_excluded: torch.Tensor | None = None


@dataclass(frozen=True)
class FeatureSet:
    """Per-step features of a set of examples.

    ``phi`` maps parameter name -> ``(N, steps, m)`` (projected) or ``(N, steps, *param.shape)``
    (exact); ``steps`` is the number of step slots.
    """

    phi: dict[str, torch.Tensor]
    steps: int

    @property
    def n(self) -> int:
        return int(next(iter(self.phi.values())).shape[0])
