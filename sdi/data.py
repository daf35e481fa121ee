"""Examples for the command line: records from a file or dataset folder, token ids, padded batches.

Sources (:func:`read_records`), by suffix or folder:

- ``.jsonl`` (also ``.json`` holding one JSON object per line): one record per line;
- ``.csv``: one record per row, the header names the fields;
- ``.parquet``: needs ``pyarrow`` (``pip install 'sdi[data]'``);
- a folder written by ``datasets.Dataset.save_to_disk``: needs ``datasets``
  (``pip install 'sdi[datasets]'``); a ``DatasetDict`` folder: pass its split's folder.

Each record gives one example (:func:`token_ids`): the text of ``text_field`` tokenised by a
tokenizer, or the pre-tokenised ids of ``ids_field`` (a list of ints; in CSV a JSON list or
space-separated ints). :class:`Batches` pads them on the right into
``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64}`` batches, re-iterable, in file order.

Every problem is a :class:`DataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

DATASET_FOLDER_FILES = ("dataset_info.json", "state.json")  # what save_to_disk writes
FORMATS = ".jsonl, .json (JSON lines), .csv, .parquet, or a datasets.save_to_disk folder"


class DataError(ValueError):
    """Unusable data: the message names the file, the row and the fix."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL / CSV / Parquet file or a ``datasets`` folder, in order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file or folder (formats: {FORMATS})")
    if path.is_dir():
        records = _read_dataset_folder(path)
    elif path.suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    elif path.suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use {FORMATS}")
    if not records:
        raise DataError(f"{path}: holds no examples")
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {line_no}: not a JSON object ({err.msg}); a JSONL file holds "
                    "one JSON object per line"
                ) from err
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}, line {line_no}: a JSON {type(record).__name__}, not an object "
                    '({"text": ...} or {"input_ids": [...]})'
                )
            records.append(record)
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install 'sdi[data]' (or pip install pyarrow)"
        ) from err
    return pq.read_table(path).to_pylist()


def _read_dataset_folder(path: Path) -> list[dict[str, Any]]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{path}: a DatasetDict folder with splits {splits}; pass one split's folder, e.g. "
            f"{path / (splits[0] if splits else 'train')}"
        )
    if not any((path / name).is_file() for name in DATASET_FOLDER_FILES):
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no "
            f"{' or '.join(DATASET_FOLDER_FILES)}); use {FORMATS}"
        )
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{path}: reading a datasets folder needs datasets: pip install 'sdi[datasets]' (or "
            "pip install datasets)"
        ) from err
    return list(datasets.load_from_disk(str(path)))


def _parse_ids(value: Any, where: str, field: str) -> list[int]:
    if isinstance(value, str):  # CSV: a JSON list or space-separated ints
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [int(t) for t in text.split()]
        except ValueError as err:
            raise DataError(
                f"{where}: field {field!r} is {value[:40]!r}, not token ids (a list of ints; in "
                "CSV a JSON list or space-separated ints)"
            ) from err
    if hasattr(value, "tolist"):  # numpy / torch arrays
        value = value.tolist()
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )
    if not ok:
        raise DataError(
            f"{where}: field {field!r} holds {type(value).__name__} {str(value)[:40]}, not token "
            "ids (a list of ints)"
        )
    return [int(v) for v in value]


def token_ids(
    records: Sequence[dict[str, Any]],
    *,
    source: str,
    text_field: str | None = None,
    ids_field: str | None = None,
    tokenize: Callable[[str], list[int]] | None = None,
    max_length: int | None = None,
    min_length: int = 1,
) -> list[list[int]]:
    """One list of token ids per record: ``tokenize(record[text_field])`` or
    ``record[ids_field]``, cut to ``max_length``; fewer than ``min_length`` ids is an error.

    ``source`` names the data in errors (its path).
    """
    if (text_field is None) == (ids_field is None):
        raise DataError(
            "give exactly one of a text field (--text-field) and an ids field (--ids-field)"
        )
    field = text_field if text_field is not None else ids_field
    if text_field is not None and tokenize is None:
        raise DataError(
            f"{source}: the text field {text_field!r} needs a tokenizer: a model folder with its "
            "tokenizer files, --tokenizer FOLDER, or pre-tokenised ids with --ids-field"
        )
    examples = []
    for row, record in enumerate(records):
        where = f"{source}, example {row}"
        if field not in record or record[field] is None:
            raise DataError(
                f"{where}: no field {field!r} (it has {sorted(record)[:10]}); name the field "
                f"with {'--text-field' if text_field is not None else '--ids-field'}"
            )
        if text_field is not None:
            value = record[field]
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: field {field!r} holds a {type(value).__name__}, not text; for "
                    "token ids use --ids-field"
                )
            ids = list(tokenize(value))
        else:
            ids = _parse_ids(record[field], where, field)
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) < min_length:
            raise DataError(
                f"{where}: {len(ids)} token(s); the loss needs at least {min_length} (a causal LM "
                "predicts each token from the ones before it). Drop or lengthen the example."
            )
        examples.append(ids)
    return examples


class Batches:
    """Re-iterable padded batches of ``examples`` in order: ``{"input_ids": (B, T) int64,
    "attention_mask": (B, T) int64}`` on ``device``, right-padded with ``pad_id`` to the batch's
    longest example (mask 0 at padding). ``texts``: the examples' texts, when they came from a
    text field (the HTML report shows them)."""

    def __init__(
        self,
        examples: list[list[int]],
        batch_size: int,
        pad_id: int,
        device: str | torch.device,
        texts: list[str] | None = None,
    ):
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = int(pad_id)
        self.device = torch.device(device)
        self.texts = texts

    def padded_length(self, row: int) -> int:
        """The length ``T`` of the batch that holds example ``row`` (its longest example)."""
        start = row - row % self.batch_size
        return max(len(ids) for ids in self.examples[start : start + self.batch_size])

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self.examples), self.batch_size):
            yield self.collate(self.examples[start : start + self.batch_size])

    def collate(self, chunk: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), longest), dtype=torch.int64)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
