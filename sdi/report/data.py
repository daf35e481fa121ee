"""The report's data: a :class:`sdi.TopInfluences` and the examples' texts as one JSON-ready dict.

The page (:mod:`sdi.report.html`) embeds this dict once and draws a page of queries at a time from
it, so the file grows linearly with the queries. Numbers are kept to 4 significant digits (3 are
shown) and a non-finite number is ``None``; each train example referenced is stored once.

Schema ``sdi-report/1``::

    {"schema": "sdi-report/1", "title": str, "k": int, "steps": int, "step_labels": [str],
     "groups": [str] | None, "has_se": bool, "has_explanations": bool,
     "train": {"<row>": {"text": str, "tokens": [str] | None}},
     "queries": [{"index": int, "text": str, "tokens": [str] | None, "n_excluded": int | None,
                  "most": [row], "least": [row]}],
     "overview": {"n_queries": int, "most_share": [S], "least_share": [S], "peak_counts": [S]}}

    row = {"train": int (-1: no finite score), "tracin": float | None, "se": float | None,
           "sdi": [S], "exp": int | None, "pos_train": [[S] x T_train] | None,
           "pos_query": [[S] x T_query] | None, "by_group": [[S] x groups] | None}

The explanation of a pair (``pos_train``, ``pos_query``, ``by_group``) is stored as integers
times ``10**exp``, the largest 4 digits long: it shares one colour scale, and integers take half
the bytes of floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..outputs import PairExplanation, TopInfluences

SCHEMA = "sdi-report/1"
SIDES = ("most", "least")


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = (
            values.numpy() if values.dtype in (torch.float32, torch.float64) else values.double()
        )
    return np.asarray(values, dtype=np.float64)


def _with_none(values: list | float, finite: np.ndarray) -> list | float | None:
    """``values`` (nested lists) with ``None`` wherever ``finite`` is False."""
    if finite.ndim == 0:
        return values if finite else None
    return [_with_none(v, f) for v, f in zip(values, finite, strict=True)]


def _round4(array: np.ndarray) -> np.ndarray:
    """Each value to 4 significant digits, as the double nearest that decimal (so that it prints
    short): ``round(x / 10**e) * 10**e`` or ``/ 10**-e``, one exact power of ten either way."""
    safe = np.where(np.isfinite(array) & (array != 0), np.abs(array), 1.0)
    shift = 3 - np.floor(np.log10(safe))  # digits after the point that keep 4 significant
    up = np.rint(array * 10.0 ** np.maximum(shift, 0)) / 10.0 ** np.maximum(shift, 0)
    down = np.rint(array / 10.0 ** np.maximum(-shift, 0)) * 10.0 ** np.maximum(-shift, 0)
    return np.where(shift >= 0, up, down)


def _num(x: float) -> float | None:
    """``x`` to 4 significant digits, ``None`` when not finite (JSON has no NaN)."""
    return _nums(np.float64(x))


def _nums(values: Any) -> list | float | None:
    """A tensor / array (any shape) as nested lists of 4-significant-digit floats, non-finite
    values as ``None``."""
    array = _numpy(values)
    finite = np.isfinite(array)
    rounded = _round4(np.where(finite, array, 0.0)).tolist()
    return rounded if finite.all() else _with_none(rounded, finite)


def _fixed(arrays: list[Any]) -> tuple[int, list]:
    """2-D tensors that share one colour scale as integers times ``10**exp``: ``(exp, [ints,
    ...])`` with the largest ``|value|`` 4 digits long (values below ``1e-4`` of it read as 0);
    about half the bytes of 4-significant-digit floats. Non-finite values are ``None``.
    One flat tensor and one ``tolist`` per call: this runs once per explained pair."""
    flat = np.concatenate([_numpy(a).ravel() for a in arrays])
    finite = np.isfinite(flat)
    top = float(np.abs(flat[finite]).max()) if finite.any() else 0.0
    exp = math.floor(math.log10(top)) - 3 if top > 0 else 0
    ints = np.rint(np.where(finite, flat, 0.0) / 10.0**exp).astype(np.int64).tolist()
    if not finite.all():
        ints = [v if f else None for v, f in zip(ints, finite.tolist(), strict=True)]
    out, start = [], 0
    for a in arrays:
        rows, cols = a.shape
        out.append([ints[start + r * cols : start + (r + 1) * cols] for r in range(rows)])
        start += rows * cols
    return exp, out


class _Examples:
    """The texts and token labels of one side (train or query), looked up by loader row."""

    def __init__(self, name: str, texts, tokens, decode: Callable[[Any], str] | None, join: str):
        if texts is None and tokens is None:
            raise ValueError(
                f"write_html needs the {name} examples: pass {name}_texts (one string per "
                f"{name} row) or {name}_tokens (one token sequence per row, with decode)"
            )
        if isinstance(texts, str):
            raise TypeError(f"{name}_texts must be one string per {name} row, not one string")
        self.name, self.texts, self.tokens, self.decode, self.join = (
            name,
            texts,
            tokens,
            decode,
            join,
        )
        self.n = len(texts) if texts is not None else len(tokens)
        if texts is not None and tokens is not None and len(tokens) != len(texts):
            raise ValueError(
                f"{len(texts)} {name}_texts but {len(tokens)} {name}_tokens: one of each per row"
            )

    def labels(self, row: int) -> list[str] | None:
        if self.tokens is None:
            return None
        ids = self.tokens[row]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [str(self.decode(t)) if self.decode is not None else str(t) for t in ids]

    def entry(self, row: int) -> dict:
        if not 0 <= row < self.n:
            raise IndexError(
                f"the results name {self.name} row {row}, but {self.n} {self.name} examples were "
                f"given: pass the texts / tokens of the whole {self.name} loader, in loader order"
            )
        labels = self.labels(row)
        text = str(self.texts[row]) if self.texts is not None else self.join.join(labels)
        return {"text": text, "tokens": labels}


def _check_top(top: TopInfluences) -> tuple[int, int, int]:
    """``(N_query, k, steps)`` of ``top``, after checking its shapes agree."""
    if not isinstance(top, TopInfluences):
        raise TypeError(f"expected a sdi.TopInfluences, got {type(top).__name__}")
    n, k = top.most_indices.shape
    steps = top.most_sdi.shape[-1]
    for side in SIDES:
        for field, shape in (("indices", (n, k)), ("tracin", (n, k)), ("sdi", (n, k, steps))):
            got = tuple(getattr(top, f"{side}_{field}").shape)
            if got != shape:
                raise ValueError(f"TopInfluences.{side}_{field} has shape {got}, expected {shape}")
        explanations = getattr(top, f"{side}_explanations")
        if explanations is not None and [len(e) for e in explanations] != [k] * n:
            raise ValueError(f"TopInfluences.{side}_explanations must hold {n} lists of {k}")
    return n, k, steps


def _se_lookup(top: TopInfluences, tracin_se) -> Callable[[int, int], float] | None:
    """``(train row, query) -> SE`` from ``tracin_se (N_train, N_query)``; ``None`` without."""
    if tracin_se is None:
        return None
    se = _numpy(tracin_se)
    if se.ndim != 2 or se.shape[1] != top.most_indices.shape[0]:
        raise ValueError(
            f"tracin_se must be (N_train, N_query) with N_query={top.most_indices.shape[0]} "
            f"(InfluenceOutputs.tracin_se), got shape {tuple(se.shape)}"
        )

    def lookup(i: int, j: int) -> float:
        if i >= se.shape[0]:
            raise IndexError(f"tracin_se has {se.shape[0]} train rows; the results name row {i}")
        return float(se[i, j])

    return lookup


def _explained(e: PairExplanation, labels: dict[str, list[str] | None], where: str) -> dict:
    """One pair's position and group shares, checking the token labels fit its positions."""
    for side in ("train", "query"):
        shares = getattr(e, f"positions_{side}")
        names = labels[side]
        if names is not None and len(names) != shares.shape[0]:
            raise ValueError(
                f"{where}: the {side} example has {len(names)} tokens but its explanation "
                f"{shares.shape[0]} positions: pass the tokens the model saw"
            )
    exp, (train, query, groups) = _fixed([e.positions_train, e.positions_query, e.by_parameter])
    return {"exp": exp, "pos_train": train, "pos_query": query, "by_group": groups}


def _share_profile(sdi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, each step's share of the ``|SDI|`` of its rows ``(N_query, k, S)`` (NaN rows
    left out), and whether the query has any: ``((N_query, S), (N_query,) bool)``."""
    per_step = sdi.abs().nan_to_num(0.0).sum(dim=1)  # (N_query, S)
    total = per_step.sum(dim=1, keepdim=True)
    return per_step / total.clamp_min(torch.finfo(per_step.dtype).tiny), total[:, 0] > 0


def overview(top: TopInfluences) -> dict:
    """Where in the loop the influence sits over all queries: per step, the mean share of the
    ``|SDI|`` of each query's most (least) influential rows, and how many queries' most
    influential rows have their largest ``|SDI|`` summed over the rows at that step."""
    out = {"n_queries": int(top.most_indices.shape[0])}
    for side in SIDES:
        shares, has = _share_profile(getattr(top, f"{side}_sdi").detach().cpu().double())
        out[f"{side}_share"] = _nums(shares[has].mean(0)) if has.any() else None
        if side == "most":
            peaks = shares[has].argmax(dim=1)
            out["peak_counts"] = torch.bincount(peaks, minlength=shares.shape[1]).tolist()
    return out


def report_data(
    top: TopInfluences,
    *,
    train_texts: Sequence[str] | None = None,
    query_texts: Sequence[str] | None = None,
    train_tokens: Sequence[Any] | None = None,
    query_tokens: Sequence[Any] | None = None,
    decode: Callable[[Any], str] | None = None,
    tracin_se: Any = None,
    step_labels: Sequence[str] | None = None,
    title: str = "Step-decomposed influence report",
    join: str = " ",
    progress: bool = False,
) -> dict:
    """The JSON-ready dict of the report (schema in the module docstring); arguments as in
    :func:`sdi.report.write_html`."""
    n, k, steps = _check_top(top)
    train = _Examples("train", train_texts, train_tokens, decode, join)
    query = _Examples("query", query_texts, query_tokens, decode, join)
    if query.n != n:
        raise ValueError(
            f"the results hold {n} queries but {query.n} query examples were given: pass the "
            "texts / tokens of the whole query loader, in loader order"
        )
    labels = [str(s) for s in step_labels] if step_labels is not None else None
    if labels is not None and len(labels) != steps:
        raise ValueError(f"{len(labels)} step_labels for {steps} steps")
    se_of = _se_lookup(top, tracin_se)
    explained = top.most_explanations is not None and top.least_explanations is not None
    groups = None
    trains: dict[str, dict] = {}
    queries = []
    indices = {side: getattr(top, f"{side}_indices").tolist() for side in SIDES}
    tracins = {side: _nums(getattr(top, f"{side}_tracin")) for side in SIDES}  # all at once:
    sdis = {side: _nums(getattr(top, f"{side}_sdi")) for side in SIDES}  # numpy, not per row
    for j in tqdm(range(n), desc="report", unit="query", disable=not progress):
        entry = {"index": j, **query.entry(j)}
        entry["n_excluded"] = None if top.n_excluded is None else int(top.n_excluded[j])
        for side in SIDES:
            rows = []
            for r, i in enumerate(indices[side][j]):
                row = {"train": i, "tracin": tracins[side][j][r], "se": None}
                row["sdi"] = sdis[side][j][r]
                row.update(exp=None, pos_train=None, pos_query=None, by_group=None)
                if i >= 0:
                    if str(i) not in trains:
                        trains[str(i)] = train.entry(i)
                    if se_of is not None:
                        row["se"] = _num(se_of(i, j))
                    if explained:
                        e = getattr(top, f"{side}_explanations")[j][r]
                        where = f"query {j}, train {i}"
                        if (e.train, e.query) != (i, j):
                            raise ValueError(
                                f"{where}: its explanation is of pair {e.train, e.query}"
                            )
                        pair_labels = {"train": trains[str(i)]["tokens"], "query": entry["tokens"]}
                        row.update(_explained(e, pair_labels, where))
                        if groups is not None and list(e.groups) != groups:
                            raise ValueError(f"{where}: groups {e.groups} differ from {groups}")
                        groups = list(e.groups)
                rows.append(row)
            entry[side] = rows
        queries.append(entry)
    return {
        "schema": SCHEMA,
        "title": str(title),
        "k": k,
        "steps": steps,
        "step_labels": labels or [str(t) for t in range(steps)],
        "groups": groups,
        "has_se": se_of is not None,
        "has_explanations": explained,
        "train": trains,
        "queries": queries,
        "overview": overview(top),
    }
