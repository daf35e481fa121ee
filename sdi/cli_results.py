"""The JSON file ``sdi attribute`` writes, and writing it atomically.

Layout (``"format": "sdi-attribute/1"``; lists are nested JSON arrays, NaN is ``null``):

- ``command``: the arguments as given; ``settings``: every option after defaults were applied;
- ``model``, ``checkpoints`` (path, ``eta``, where ``eta`` came from), ``train`` / ``query``
  (path, number of examples, field, sha256 of a data file), ``target_modules`` (the core's module
  names) and ``step_plan``, ``loss``, ``environment`` (versions, device, kernel backend);
- ``top``: :class:`sdi.outputs.TopInfluences` as arrays -- ``most_indices`` / ``least_indices``
  ``(N_query, k)`` (train rows, file order), ``most_tracin`` / ``least_tracin`` ``(N_query, k)``,
  ``most_sdi`` / ``least_sdi`` ``(N_query, k, steps)``, ``n_excluded (N_query,)``; with
  ``--standard-errors`` also ``most_tracin_se`` / ``least_tracin_se`` ``(N_query, k)``;
- ``explanations`` (with ``--explain``): ``{"most": [[pair, ...] per query], "least": ...}``, each
  pair ``{train, query, sdi (steps,), positions_train (T_i, steps), positions_query (T_j, steps),
  by_parameter (groups, steps), groups}``;
- ``report``: the data of the HTML report (:mod:`sdi.report.data`, schema ``sdi-report/1``: texts,
  top pairs, SE, explanations with token labels), from which ``sdi report`` rebuilds the page.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .outputs import PairExplanation, TopInfluences
from .steps import StepPlan

FORMAT = "sdi-attribute/1"


def plain(value: Any) -> Any:
    """``value`` with tensors as lists and non-finite floats as ``None`` (strict JSON)."""
    if torch.is_tensor(value):
        value = value.detach().cpu().tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def step_plan_json(plan: StepPlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    modules = {plan.names.get(m, type(m).__name__): slots for m, slots in plan.slots.items()}
    return {"steps": plan.steps, "labels": list(plan.labels), "modules": modules}


def _explanation(e: PairExplanation) -> dict[str, Any]:
    return {
        "train": e.train,
        "query": e.query,
        "sdi": e.sdi,
        "positions_train": e.positions_train,
        "positions_query": e.positions_query,
        "by_parameter": e.by_parameter,
        "groups": list(e.groups),
    }


def top_json(top: TopInfluences, se: torch.Tensor | None) -> dict[str, Any]:
    """The ``top`` section; ``se (N_train, N_query)``: TracIn standard errors, picked per pair."""
    out: dict[str, Any] = {}
    for side in ("most", "least"):
        indices = getattr(top, f"{side}_indices")
        out[f"{side}_indices"] = indices
        out[f"{side}_tracin"] = getattr(top, f"{side}_tracin")
        out[f"{side}_sdi"] = getattr(top, f"{side}_sdi")
        if se is not None:
            columns = torch.arange(indices.shape[0])[:, None].expand_as(indices)
            picked = se[indices.clamp_min(0), columns]
            out[f"{side}_tracin_se"] = picked.masked_fill(indices < 0, float("nan"))
    out["n_excluded"] = top.n_excluded
    return out


def explanations_json(top: TopInfluences) -> dict[str, Any] | None:
    if top.most_explanations is None:
        return None
    return {
        side: [[_explanation(e) for e in row] for row in getattr(top, f"{side}_explanations")]
        for side in ("most", "least")
    }


def write_json_atomic(path: str | Path, content: dict[str, Any]) -> None:
    """Write ``content`` to ``path`` at once (:func:`write_files_atomic`)."""
    write_files_atomic({Path(path): json_text(content)})


def json_text(content: dict[str, Any]) -> str:
    """``content`` as the strict JSON text of a results file (NaN as ``null``)."""
    return json.dumps(plain(content), indent=1, allow_nan=False) + "\n"


def write_files_atomic(files: dict[Path, str]) -> None:
    """Write each text to its path at once: all to temporary files in their folders first, then
    each renamed over its path (``os.replace``). A failure while writing leaves the old files or
    none, never half a file, and no temporary file."""
    written: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            tmp = temporary_beside(path)
            written.append((tmp, path))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise


def temporary_beside(path: Path) -> str:
    """A new empty temporary file in ``path``'s folder, with the permissions a plain new file
    gets (``mkstemp`` makes it private, which a report to share must not stay)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)  # read it by setting it; put back at once
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp
