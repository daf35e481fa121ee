"""Plots of SDI: which training examples mattered to a query, and at which loop step.

Needs matplotlib (``pip install 'sdi[plot]'``); it is imported inside the functions, so
``import sdi`` never does. Every function draws into a new figure (or into ``ax`` when given),
saves it as a PNG when ``path`` is given, and returns the figure. Inputs may be torch tensors or
numpy arrays, with the shapes of :class:`sdi.InfluenceOutputs`:

- :func:`sdi_heatmap`: one query's SDI over steps for its top-k training examples (k x steps);
- :func:`step_influence`: per-step SDI lines for a few training examples and one query;
- :func:`step_matrix_heatmap`: one (train, query) pair's step x step matrix ``M[s, t]``;
- :func:`position_step_heatmap`: one pair's SDI split by sequence position (positions x steps), from
  a :class:`sdi.PairExplanation`;
- :func:`parameter_step_plot`: one pair's SDI split by parameter group, stacked per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64)
    return np.asarray(x, dtype=np.float64)


def _axes(ax):
    """``(figure, axes)``: ``ax``'s, or a new figure made without pyplot (no global state)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, path: str | Path | None, dpi: int):
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _step_ticks(ax, axis: str, steps: int, labels: Sequence[str] | None) -> None:
    labels = list(labels) if labels is not None else [str(t) for t in range(steps)]
    if len(labels) != steps:
        raise ValueError(f"{len(labels)} step labels for {steps} steps")
    getattr(ax, f"set_{axis}ticks")(range(steps), labels)


def _symmetric_image(fig, ax, values: np.ndarray, label: str):
    """``imshow`` on a diverging scale centred at 0, with a colour bar."""
    bound = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label=label)
    return image


def top_train(sdi: Any, query: int, k: int, by: str = "tracin") -> np.ndarray:
    """Indices of the ``k`` training examples with the largest TracIn (``by="tracin"``) or largest
    absolute TracIn (``by="abs"``) for column ``query`` of ``sdi (N_train, N_query, steps)``."""
    tracin = _numpy(sdi)[:, query].sum(axis=1)
    if by == "abs":
        tracin = np.abs(tracin)
    elif by != "tracin":
        raise ValueError(f"by must be 'tracin' or 'abs', got {by!r}")
    return np.argsort(-tracin, kind="stable")[:k]


def sdi_heatmap(
    sdi: Any,
    query: int,
    k: int = 10,
    *,
    by: str = "tracin",
    step_labels: Sequence[str] | None = None,
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
):
    """Heatmap of ``SDI[i, query, t]`` for the top-``k`` training examples ``i`` (rows, in rank
    order, see :func:`top_train`) over the steps ``t`` (columns).

    ``sdi``: ``(N_train, N_query, steps)``. Rows are labelled with the training indices.
    """
    values = _numpy(sdi)
    rows = top_train(values, query, k, by)
    fig, ax = _axes(ax)
    _symmetric_image(fig, ax, values[rows, query], "SDI")
    ax.set_yticks(range(len(rows)), [str(i) for i in rows])
    _step_ticks(ax, "x", values.shape[2], step_labels)
    ax.set_xlabel("loop step")
    ax.set_ylabel("training example")
    ax.set_title(f"SDI of the top-{len(rows)} training examples for query {query}")
    return _finish(fig, path, dpi)


def step_influence(
    sdi: Any,
    query: int,
    train: Sequence[int] | None = None,
    *,
    k: int = 5,
    step_labels: Sequence[str] | None = None,
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
):
    """Lines of ``SDI[i, query, t]`` over the steps ``t``, one per training example ``i``.

    ``sdi``: ``(N_train, N_query, steps)``; ``train``: the training indices, by default the
    top-``k`` by TracIn (:func:`top_train`).
    """
    values = _numpy(sdi)
    rows = top_train(values, query, k) if train is None else list(train)
    fig, ax = _axes(ax)
    steps = np.arange(values.shape[2])
    for i in rows:
        ax.plot(steps, values[i, query], marker="o", label=f"train {i}")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _step_ticks(ax, "x", values.shape[2], step_labels)
    ax.set_xlabel("loop step")
    ax.set_ylabel("SDI")
    ax.set_title(f"Per-step influence on query {query}")
    ax.legend(fontsize="small")
    return _finish(fig, path, dpi)


def step_matrix_heatmap(
    sdi_matrix: Any,
    train: int | None = None,
    query: int | None = None,
    *,
    step_labels: Sequence[str] | None = None,
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
):
    """Heatmap of the step matrix ``M[s, t]``: train step ``s`` (rows) against query step ``t``.

    ``sdi_matrix``: ``(N_train, N_query, steps_tr, steps_q)`` with ``train`` and ``query`` picking
    the pair, or one ``(steps_tr, steps_q)`` matrix with both left ``None``.
    """
    values = _numpy(sdi_matrix)
    if values.ndim == 4:
        if train is None or query is None:
            raise ValueError("a 4-D step matrix needs train and query indices")
        values = values[train, query]
    elif values.ndim != 2 or train is not None or query is not None:
        raise ValueError(
            f"expected (N_train, N_query, S_tr, S_q) with indices or (S_tr, S_q) without, "
            f"got shape {values.shape} with train={train}, query={query}"
        )
    fig, ax = _axes(ax)
    _symmetric_image(fig, ax, values, "step-matrix influence")
    _step_ticks(ax, "y", values.shape[0], step_labels)
    _step_ticks(ax, "x", values.shape[1], step_labels)
    ax.set_ylabel("train step s")
    ax.set_xlabel("query step t")
    pair = "" if train is None else f": train {train}, query {query}"
    ax.set_title(f"Step x step influence{pair}")
    return _finish(fig, path, dpi)


def _token_labels(tokens: Any, decode, length: int) -> list[str]:
    """One label per position: ``decode(token)`` when ``decode`` is given, else ``str(token)``."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    if isinstance(tokens, str):
        raise TypeError("tokens must be one entry per position (a list or tensor), not a string")
    tokens = list(tokens)
    if len(tokens) != length:
        raise ValueError(f"{len(tokens)} tokens for {length} positions")
    return [str(decode(t)) if decode is not None else str(t) for t in tokens]


def position_step_heatmap(
    explanation: Any,
    *,
    side: str = "train",
    tokens: Any = None,
    decode=None,
    step_labels: Sequence[str] | None = None,
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
):
    """Heatmap of one pair's SDI split by position: position ``p`` of the ``side`` sequence (rows)
    against the query's loop step ``t`` (columns); the rows sum to the pair's SDI per step.

    ``explanation``: a :class:`sdi.PairExplanation` (``side="train"`` shows ``positions_train``,
    ``"query"`` ``positions_query``) or a ``(T, steps)`` array. ``tokens``: the sequence's tokens,
    one per position, shown as row labels (``decode(token)`` each, when ``decode`` is given: e.g.
    a tokenizer's ``decode``); without them the rows are numbered.
    """
    if side not in ("train", "query"):
        raise ValueError(f"side must be 'train' or 'query', got {side!r}")
    values = getattr(explanation, f"positions_{side}", explanation)
    values = _numpy(values)
    if values.ndim != 2:
        raise ValueError(f"expected (positions, steps), got shape {values.shape}")
    fig, ax = _axes(ax)
    _symmetric_image(fig, ax, values, "SDI share")
    if tokens is not None:
        ax.set_yticks(range(values.shape[0]), _token_labels(tokens, decode, values.shape[0]))
    _step_ticks(ax, "x", values.shape[1], step_labels)
    ax.set_xlabel("query loop step t")
    ax.set_ylabel(f"{side} position")
    pair = getattr(explanation, "train", None)
    name = "" if pair is None else f": train {explanation.train}, query {explanation.query}"
    ax.set_title(f"Where in the {side} sequence{name}")
    return _finish(fig, path, dpi)


def parameter_step_plot(
    explanation: Any,
    groups: Sequence[str] | None = None,
    *,
    step_labels: Sequence[str] | None = None,
    ax=None,
    path: str | Path | None = None,
    dpi: int = 120,
):
    """Stacked bars of one pair's SDI split by parameter group, per loop step, with the total as a
    line. Positive shares stack up from 0, negative ones down, so each step's bars add up to the
    total.

    ``explanation``: a :class:`sdi.PairExplanation` (its ``by_parameter`` and ``groups``) or a
    ``(groups, steps)`` array with ``groups`` naming its rows.
    """
    values = _numpy(getattr(explanation, "by_parameter", explanation))
    groups = list(getattr(explanation, "groups", groups) or [])
    if values.ndim != 2 or len(groups) != values.shape[0]:
        raise ValueError(
            f"expected (groups, steps) with one name per group, got shape {values.shape} "
            f"and {len(groups)} names"
        )
    fig, ax = _axes(ax)
    steps = np.arange(values.shape[1])
    up, down = np.zeros(values.shape[1]), np.zeros(values.shape[1])
    for name, share in zip(groups, values, strict=True):
        bottom = np.where(share >= 0, up, down)
        ax.bar(steps, share, bottom=bottom, label=name)
        up, down = up + np.maximum(share, 0), down + np.minimum(share, 0)
    ax.plot(steps, values.sum(axis=0), color="black", marker="o", label="SDI (total)")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _step_ticks(ax, "x", values.shape[1], step_labels)
    ax.set_xlabel("query loop step t")
    ax.set_ylabel("SDI share")
    pair = getattr(explanation, "train", None)
    name = "" if pair is None else f": train {explanation.train}, query {explanation.query}"
    ax.set_title(f"Through which weights{name}")
    ax.legend(fontsize="small")
    return _finish(fig, path, dpi)
