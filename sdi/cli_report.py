"""The HTML report on the command line: what ``sdi attribute`` writes next to its JSON, and
``sdi report results.json`` that rebuilds it.

``sdi attribute`` puts the report's data (:func:`sdi.report.report_data`: texts, top pairs, TracIn
standard errors, explanations with token labels) in its results JSON under ``"report"`` and writes
the page (:func:`sdi.report.render_html`) beside it, ``results.html`` by default. ``sdi report``
reads that data back (:func:`sdi.report.write_html_from_json`), so the page it writes is the same.

Texts come from the data file's text field; pre-tokenised ids are decoded with the tokenizer when
there is one, else shown as the ids. With ``--explain`` each example also carries one label per
position of its batch (the batches are right-padded, and the explanations have a row per padded
position): the token, or ``(pad)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .cli_inputs import UsageError, load_tokenizer
from .cli_results import temporary_beside
from .data import Batches
from .report import report_data, write_html_from_json
from .report.data import SCHEMA

PAD_LABEL = "(pad)"


class _LazyRows(Sequence):
    """``rows[i] = make(i)`` for ``i < n``, computed when read: the report reads only the train
    rows it shows, so a large train set is not decoded whole."""

    def __init__(self, n: int, make: Callable[[int], Any]):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, row: int) -> Any:
        if not 0 <= row < self.n:
            raise IndexError(row)
        return self.make(row)


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    if tokenizer is None:
        return lambda ids: " ".join(str(t) for t in ids)
    return lambda ids: tokenizer.decode(ids)


def example_texts(batches: Batches, tokenizer: Any) -> Sequence[str]:
    """One text per example: its text field, else its ids decoded (``tokenizer``) or listed."""
    if batches.texts is not None:
        return batches.texts
    decode = _decoder(tokenizer)
    return _LazyRows(len(batches.examples), lambda row: decode(batches.examples[row]))


def example_tokens(batches: Batches, tokenizer: Any) -> Sequence[list[str]]:
    """One label per position of each example's padded batch row: the token (decoded alone), or
    :data:`PAD_LABEL` past its end, so the labels line up with the explanations' positions."""
    decode = _decoder(tokenizer)

    def labels(row: int) -> list[str]:
        ids = batches.examples[row]
        padding = batches.padded_length(row) - len(ids)
        return [decode([t]) for t in ids] + [PAD_LABEL] * padding

    return _LazyRows(len(batches.examples), labels)


def decoding_tokenizer(inputs: Any, args: argparse.Namespace) -> Any:
    """The tokenizer that turns ids back into text: the one that tokenised the data; with
    ``--ids-field``, that of ``--tokenizer`` or the model folder when it has one, else ``None``."""
    if inputs.tokenizer is not None:
        return inputs.tokenizer
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)  # asked for: a missing one is an error
    if inputs.model_folder is None:
        return None
    try:
        return load_tokenizer(inputs.model_folder)
    except UsageError:  # a model folder without tokenizer files: the report shows the ids
        return None


def _short(step_labels: Sequence[str]) -> list[str]:
    """The step plan's labels as short column heads: ``pass t`` as ``t``; ``prelude`` and
    ``readout`` (``--allow-mixed-steps``) as they are."""
    return [label.removeprefix("pass ") for label in step_labels]


def _positions_fit(top: Any, train: Batches, query: Batches) -> bool:
    """Whether every explanation has one position per token of its padded batch row. A model
    whose core sees other positions (added or dropped ones) gets position numbers as labels and a
    warning, rather than losing the results to an error at the end of the run."""
    for side in ("most", "least"):
        for e in (e for row in getattr(top, f"{side}_explanations") for e in row):
            if e.train < 0:
                continue
            seen = (e.positions_train.shape[0], e.positions_query.shape[0])
            tokens = (train.padded_length(e.train), query.padded_length(e.query))
            if seen != tokens:
                print(
                    f"sdi: the report numbers the positions: the looped core sees {seen[0]} and "
                    f"{seen[1]} positions of train example {e.train} and query {e.query}, whose "
                    f"padded batches hold {tokens[0]} and {tokens[1]} tokens",
                    file=sys.stderr,
                )
                return False
    return True


def attribute_report_data(
    top: Any,
    *,
    train: Batches,
    query: Batches,
    tokenizer: Any,
    tracin_se: torch.Tensor | None,
    step_labels: Sequence[str] | None,
    title: str,
    progress: bool,
) -> dict[str, Any]:
    """The report data of one ``sdi attribute`` run (schema ``sdi-report/1``); the token labels
    only with explanations (they label the position heatmaps, and cost bytes otherwise)."""
    labelled = top.most_explanations is not None and _positions_fit(top, train, query)
    steps = top.most_sdi.shape[-1]
    return report_data(
        top,
        train_texts=example_texts(train, tokenizer),
        query_texts=example_texts(query, tokenizer),
        train_tokens=example_tokens(train, tokenizer) if labelled else None,
        query_tokens=example_tokens(query, tokenizer) if labelled else None,
        tracin_se=tracin_se,
        step_labels=_short(step_labels) if step_labels and len(step_labels) == steps else None,
        title=title,
        progress=progress,
    )


def report_path(args: argparse.Namespace, out: Path) -> Path | None:
    """Where ``sdi attribute`` writes the report: ``--report PATH``, none with ``--no-report``,
    else beside ``--out`` with the suffix ``.html``."""
    if args.no_report:
        return None
    path = Path(args.report) if args.report is not None else out.with_suffix(".html")
    if not path.parent.is_dir():
        raise UsageError(f"--report {path}: the folder {path.parent} does not exist")
    if path.resolve() == out.resolve():
        raise UsageError(f"--report {path} is the --out file: give the report another path")
    return path


def add_report_options(attribute: argparse.ArgumentParser) -> None:
    """``--report PATH`` / ``--no-report`` of ``sdi attribute``."""
    where = attribute.add_mutually_exclusive_group()
    where.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="where to write the HTML report (default: --out with the suffix .html)",
    )
    where.add_argument(
        "--no-report",
        action="store_true",
        help="write no HTML report (the JSON still holds its data, for `sdi report`)",
    )


def add_report_command(commands: Any) -> argparse.ArgumentParser:
    """The ``sdi report`` subcommand."""
    report = commands.add_parser(
        "report",
        help="rebuild the HTML report from the JSON of `sdi attribute`",
        description="Write the self-contained HTML report of a results JSON written by `sdi "
        'attribute` (its "report" data), e.g. after copying the JSON to another machine.',
    )
    report.add_argument("results", help="the JSON file `sdi attribute --out` wrote")
    report.add_argument(
        "-o",
        "--out",
        default=None,
        help="the HTML file to write (default: the JSON's path with the suffix .html)",
    )
    report.add_argument(
        "--page-size", type=int, default=10, help="queries per page when it opens (default: 10)"
    )
    report.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return report


def report_command(args: argparse.Namespace) -> int:
    """``sdi report``: :func:`sdi.report.write_html_from_json` into a temporary file beside the
    output, renamed over it when complete (a failure leaves the old file or none)."""
    results = Path(args.results)
    if not results.is_file():
        raise UsageError(f"{results}: no such results file (the JSON `sdi attribute` wrote)")
    if args.page_size < 1:
        raise UsageError(f"--page-size must be positive, got {args.page_size}")
    out = Path(args.out) if args.out is not None else results.with_suffix(".html")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if out.resolve() == results.resolve():
        raise UsageError(f"--out {out} is the results file: give the report another path")
    tmp = temporary_beside(out)
    try:
        write_html_from_json(results, tmp, page_size=args.page_size)
        os.replace(tmp, out)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        # ValueError: not JSON / no report in it; the others: report data of the wrong shape.
        why = f"its report data has no {err}" if isinstance(err, KeyError) else str(err)
        raise UsageError(
            f"{results}: cannot rebuild the report ({why}). It needs the "
            f"JSON of `sdi attribute`, which holds the report's data (schema {SCHEMA!r}) under "
            '"report"; for a JSON of an older sdi, run `sdi attribute` again'
        ) from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    print(f"sdi: report -> {out}", file=sys.stderr)
    return 0
