"""Results as JSON and back: a :class:`sdi.TopInfluences` as plain lists (for a results file), and
the file a report is rebuilt from (:func:`sdi.report.write_html_from_json`).

A results JSON holds either the report data itself (``{"schema": "sdi-report/1", ...}``, at the top
or under ``"report"``), or ``"top_influences"`` (:func:`top_influences_to_dict`) with the texts:
``"train_texts"`` / ``"query_texts"`` (or ``"train_tokens"`` / ``"query_tokens"``, labels as
strings), and optionally ``"tracin_se"`` ``(N_train, N_query)`` and ``"title"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..outputs import PairExplanation, TopInfluences
from .data import SCHEMA, report_data

_TENSORS = ("indices", "tracin", "sdi")
_EXPLAINED = ("sdi", "positions_train", "positions_query", "by_parameter")


def _floats(t: torch.Tensor) -> list:
    """Nested lists with NaN / inf as ``None`` (JSON has neither)."""
    t = t.detach().cpu().double()
    return t.where(torch.isfinite(t), torch.nan).tolist() if t.numel() else t.tolist()


def _nan_none(value):
    if isinstance(value, list):
        return [_nan_none(v) for v in value]
    return None if value != value else value  # NaN is the only value unequal to itself


def _tensor(value, dtype) -> torch.Tensor:
    if dtype is torch.int64:
        return torch.tensor(value, dtype=dtype)
    return torch.tensor(_none_nan(value), dtype=dtype)


def _none_nan(value):
    if isinstance(value, list):
        return [_none_nan(v) for v in value]
    return float("nan") if value is None else value


def top_influences_to_dict(top: TopInfluences) -> dict:
    """``top`` as JSON-ready nested lists (non-finite numbers as ``None``), explanations included."""
    out = {}
    for side in ("most", "least"):
        for field in _TENSORS:
            t = getattr(top, f"{side}_{field}")
            out[f"{side}_{field}"] = t.tolist() if field == "indices" else _nan_none(_floats(t))
        explanations = getattr(top, f"{side}_explanations")
        out[f"{side}_explanations"] = (
            None
            if explanations is None
            else [
                [
                    {"train": e.train, "query": e.query, "groups": list(e.groups)}
                    | {f: _nan_none(_floats(getattr(e, f))) for f in _EXPLAINED}
                    for e in row
                ]
                for row in explanations
            ]
        )
    out["n_excluded"] = None if top.n_excluded is None else top.n_excluded.tolist()
    return out


def top_influences_from_dict(d: dict) -> TopInfluences:
    """The inverse of :func:`top_influences_to_dict` (``None`` back to NaN)."""
    fields = {}
    for side in ("most", "least"):
        for field in _TENSORS:
            dtype = torch.int64 if field == "indices" else torch.float32
            fields[f"{side}_{field}"] = _tensor(d[f"{side}_{field}"], dtype)
        rows = d.get(f"{side}_explanations")
        fields[f"{side}_explanations"] = (
            None
            if rows is None
            else [
                [
                    PairExplanation(
                        train=int(e["train"]),
                        query=int(e["query"]),
                        groups=tuple(e["groups"]),
                        **{f: _tensor(e[f], torch.float32) for f in _EXPLAINED},
                    )
                    for e in row
                ]
                for row in rows
            ]
        )
    excluded = d.get("n_excluded")
    fields["n_excluded"] = None if excluded is None else torch.tensor(excluded, dtype=torch.int64)
    return TopInfluences(**fields)


def report_data_from_json(path: str | Path) -> dict:
    """The report data held by the results JSON at ``path`` (see the module docstring)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read results JSON {path}: {err}") from err
    if not isinstance(results, dict):
        results = {}
    if results.get("schema") == SCHEMA:
        return results
    nested = results.get("report")
    if isinstance(nested, dict) and nested.get("schema") == SCHEMA:
        return nested
    if isinstance(results.get("top_influences"), dict):
        se = results.get("tracin_se")
        return report_data(
            top_influences_from_dict(results["top_influences"]),
            train_texts=results.get("train_texts"),
            query_texts=results.get("query_texts"),
            train_tokens=results.get("train_tokens"),
            query_tokens=results.get("query_tokens"),
            tracin_se=None if se is None else _tensor(se, torch.float64),
            title=results.get("title", "Step-decomposed influence report"),
        )
    raise ValueError(
        f"{path} holds no report: expected report data (schema {SCHEMA!r}, at the top or under "
        '"report") or "top_influences" with "train_texts" and "query_texts"'
    )
