"""A report a person can browse: one self-contained HTML file of the top influences.

:func:`write_html` takes a :class:`sdi.TopInfluences` (with its explanations, when present) and
the texts (or tokens) of the train and query examples; :func:`write_html_from_json` rebuilds the
report from a results JSON (:mod:`sdi.report.json_io`). Per query the page shows its text, the
``k`` most and least influential training examples with TracIn (± SE when given), each one's SDI
over the loop steps, the position x step and parameter-group x step heatmaps of explained pairs,
and an overview of where in the loop the influence sits over all queries.

- :mod:`sdi.report.data`: TopInfluences + texts -> the JSON-ready report data
- :mod:`sdi.report.html`: the page (inline CSS, the data as JSON, :file:`report.js` draws it)
- :mod:`sdi.report.colors`: the colour-blind-safe diverging scale
- :mod:`sdi.report.json_io`: TopInfluences <-> JSON, and reading a results JSON
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..outputs import TopInfluences
from .data import report_data
from .html import render_html, write_report_html
from .json_io import report_data_from_json, top_influences_from_dict, top_influences_to_dict

__all__ = [
    "write_html",
    "write_html_from_json",
    "report_data",
    "render_html",
    "top_influences_to_dict",
    "top_influences_from_dict",
]


def write_html(
    path: str | Path,
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
    page_size: int = 10,
    progress: bool = False,
) -> Path:
    """Write the report of ``top`` to ``path`` as one self-contained HTML file; returns the path.

    - ``top``: from ``top_influences(..., explain=...)`` (the heatmaps need the explanations;
      without them the rows show TracIn and SDI only)
    - ``train_texts`` / ``query_texts``: one string per row of the train / query loader, in loader
      order; or ``train_tokens`` / ``query_tokens``: one token sequence per row (a list, or a row of
      an ``(N, T)`` tensor), each token shown as ``decode(token)`` (``str(token)`` without
      ``decode``) and the text as the tokens joined by ``join``. Tokens label the rows of the
      position heatmaps; give them (with texts or alone) to see tokens rather than position numbers.
    - ``tracin_se``: ``InfluenceOutputs.tracin_se (N_train, N_query)``, shown as TracIn ± SE
    - ``step_labels``: one label per loop step (default ``0..steps-1``)
    - ``page_size``: queries per page when the file opens (the reader can change it)
    - ``progress``: a progress bar over the queries (1,000 explained queries take seconds)
    """
    data = report_data(
        top,
        train_texts=train_texts,
        query_texts=query_texts,
        train_tokens=train_tokens,
        query_tokens=query_tokens,
        decode=decode,
        tracin_se=tracin_se,
        step_labels=step_labels,
        title=title,
        join=join,
        progress=progress,
    )
    return write_report_html(path, data, page_size=page_size)


def write_html_from_json(results_json: str | Path, out_path: str | Path, page_size: int = 10):
    """Rebuild the report from a results JSON (the report data, or ``"top_influences"`` with the
    texts: :mod:`sdi.report.json_io`) into ``out_path``; returns the path."""
    return write_report_html(out_path, report_data_from_json(results_json), page_size=page_size)
