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
    - ``sdi_by_parameter`` (``mode="sdi"``) or ``tracin_by_parameter`` (``mode="tracin"``): with
      ``by_parameter``, ``{group: tensor shaped like sdi / tracin}``, each group's share; the shares
      add up to ``sdi`` / ``tracin`` to float rounding (:mod:`sdi.parameter_groups`)
    """

    sdi: torch.Tensor | None
    tracin: torch.Tensor
    sdi_matrix: torch.Tensor | None = None
    sdi_se: torch.Tensor | None = None
    tracin_se: torch.Tensor | None = None
    sdi_by_parameter: dict[str, torch.Tensor] | None = None
    tracin_by_parameter: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class TopInfluences:
    """The ``k`` most and ``k`` least influential train examples for each query.

    Row ``j`` belongs to query ``j`` (query loader order); indices are rows of the train loader.
    ``*_indices (N_query, k)`` int64, ``*_tracin (N_query, k)``, ``*_sdi (N_query, k, steps_query)``;
    ``most_*`` sorted by decreasing TracIn, ``least_*`` by increasing TracIn.
    ``*_explanations``: with ``explain=True``, per query the :class:`PairExplanation` of each of
    its ``*_indices`` (a list of ``N_query`` lists of ``k``).

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
    most_explanations: list[list[PairExplanation]] | None = None
    least_explanations: list[list[PairExplanation]] | None = None
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


@dataclass(frozen=True)
class PairExplanation:
    """Where in the sequences and through which weights one (train, query) pair's SDI came from
    (:mod:`sdi.explain`), summed over checkpoints, fp32 on the CPU.

    - ``train``, ``query``: the pair's rows in the train and query loaders
    - ``sdi (steps_q,)``: the pair's SDI
    - ``positions_train (T_train, steps_q)``: the share of each position of the train sequence
    - ``positions_query (T_query, steps_q)``: the share of each position of the query sequence
    - ``by_parameter (groups, steps_q)``: the share of each parameter group, named by ``groups``

    Each of the last three sums over its first axis to ``sdi`` (to float rounding).
    """

    train: int
    query: int
    sdi: torch.Tensor
    positions_train: torch.Tensor
    positions_query: torch.Tensor
    by_parameter: torch.Tensor
    groups: tuple[str, ...]
