"""What the command line's arguments name, loaded: the model, its tokenizer, the checkpoints, the
looped core, the loss and the data. Every bad input is a :class:`UsageError` naming the fix.

- Model: a local Hugging Face folder (``config.json``; ``AutoModelForCausalLM`` or
  ``--model-class``, ``from_pretrained(..., local_files_only=True)``), or ``package.module:factory``
  (a callable returning an ``nn.Module``; the current folder is importable).
- Checkpoints: files, globs (``'run/checkpoint-*'``), Trainer checkpoint folders, or a Trainer
  output folder holding ``checkpoint-N`` folders (taken in step order). None given: the model
  folder itself. The weight ``eta_k`` of each comes from the checkpoint (:mod:`sdi.checkpoints`).
- Target modules: ``auto`` (:mod:`sdi.auto_core`) or comma-separated submodule names.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from .checkpoints import FOLDER_WEIGHT_FILES, LoadedCheckpoint, default_load_checkpoint
from .data import Batches, read_records, token_ids

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UsageError(ValueError):
    """Bad command-line input; the message says what to change."""


def load_callable(spec: str, what: str) -> Callable:
    """The object ``module:attr`` (``attr`` may be dotted), importable from the current folder."""
    if not _FACTORY.match(spec):
        raise UsageError(f"{what} {spec!r}: expected package.module:name")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own modules import
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(
            f"{what} {spec!r}: cannot import {module_name!r} ({err}); run from the folder that "
            "holds it or add it to PYTHONPATH"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UsageError(
            "a Hugging Face model folder needs transformers: pip install 'sdi[hf]'"
        ) from err
    return transformers


def load_model(spec: str, model_class: str) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, description)`` for a model folder or ``package.module:factory``."""
    path = Path(spec)
    if path.is_dir():
        return _load_hf_folder(path, model_class)
    if _FACTORY.match(spec) and not path.exists():
        model = load_callable(spec, "--model")()
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model, {"source": spec, "kind": "factory", "class": type(model).__name__}
    if path.is_file():
        raise UsageError(
            f"--model {spec!r} is a file: pass the folder holding it with config.json (a Hugging "
            "Face model folder), or package.module:factory; checkpoint files go to --checkpoints"
        )
    raise UsageError(
        f"--model {spec!r}: no such folder. Pass a local Hugging Face model folder (with "
        "config.json, as save_pretrained writes it) or package.module:factory"
    )


def _load_hf_folder(path: Path, model_class: str) -> tuple[nn.Module, dict[str, Any]]:
    if not (path / "config.json").is_file():
        raise UsageError(
            f"--model {path}: a folder without config.json, not a Hugging Face model folder "
            "(save one with model.save_pretrained(folder)), or pass package.module:factory"
        )
    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()  # no bar per loaded checkpoint
    cls = getattr(transformers, model_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UsageError(
            f"--model-class {model_class!r}: transformers {transformers.__version__} has no such "
            "model class; use AutoModelForCausalLM (default) or a class it exports, such as "
            "HrmTextForCausalLM"
        )
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"--model {path}: {model_class} cannot load it ({first}). If transformers "
            f"{transformers.__version__} does not know its model type, upgrade transformers; "
            "for another head pass --model-class (e.g. AlbertForMaskedLM with your own --loss), "
            "or build it yourself with --model package.module:factory"
        ) from err
    config = model.config
    return model, {
        "source": str(path),
        "kind": "huggingface",
        "class": type(model).__name__,
        "model_class": model_class,
        "model_type": getattr(config, "model_type", None),
        "transformers": transformers.__version__,
    }


def hf_checkpoint_loader(model_class: str) -> Callable[[str | Path], dict[str, Any]]:
    """A ``load_checkpoint_fn`` for a Hugging Face model: a checkpoint folder with ``config.json``
    loads through ``from_pretrained`` (as the model did), any other checkpoint as
    :func:`sdi.checkpoints.default_load_checkpoint` loads it.

    ``from_pretrained`` undoes the renaming that ``save_pretrained`` applies to some models' weights
    (transformers 5 saves HRM-text's fused ``gqkv_proj`` as separate ``q/k/v_proj``), which a
    plain read of ``model.safetensors`` cannot. The result is a
    :class:`sdi.checkpoints.LoadedCheckpoint` of the folder, so ``eta`` still comes from its
    ``trainer_state.json``.
    """
    cls = getattr(_transformers(), model_class)

    def load(path: str | Path) -> dict[str, Any]:
        folder = Path(path)
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            return default_load_checkpoint(path)
        try:
            state = cls.from_pretrained(str(folder), local_files_only=True).state_dict()
        except (ValueError, KeyError, OSError) as err:
            raise UsageError(f"checkpoint {folder}: {model_class} cannot load it ({err})") from err
        return LoadedCheckpoint({"model_state_dict": state}, path=folder, folder=folder)

    return load


def load_tokenizer(folder: str | Path) -> Any:
    """The ``AutoTokenizer`` of ``folder`` (local files only)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(
            f"no tokenizer in {folder} ({str(err).splitlines()[0] if str(err) else err!r}): save "
            "one there with tokenizer.save_pretrained, pass --tokenizer FOLDER, or give "
            "pre-tokenised ids with --ids-field"
        ) from err


def _step_of(path: str) -> tuple:
    """Sort key: the numbers in the name, as numbers (checkpoint-10 after checkpoint-9)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _is_checkpoint_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in FOLDER_WEIGHT_FILES)


def resolve_checkpoints(items: list[str] | None, model_folder: Path | None) -> list[str]:
    """The checkpoint paths named by ``items`` (files, globs, folders), in order."""
    if not items:
        if model_folder is None:
            raise UsageError("--checkpoints is required with --model package.module:factory")
        return [str(model_folder)]
    paths: list[str] = []
    for item in items:
        if glob.has_magic(item):
            matched = sorted(glob.glob(item), key=_step_of)
            if not matched:
                raise UsageError(f"--checkpoints {item!r}: the pattern matches nothing")
            paths += matched
            continue
        path = Path(item)
        if path.is_file() or (path.is_dir() and _is_checkpoint_folder(path)):
            paths.append(item)
        elif path.is_dir():
            inner = sorted(
                (str(p) for p in path.glob("checkpoint-*") if _is_checkpoint_folder(p)),
                key=_step_of,
            )
            if not inner:
                raise UsageError(
                    f"--checkpoints {item}: a folder with neither model weights "
                    f"({', '.join(FOLDER_WEIGHT_FILES)}) nor checkpoint-N folders"
                )
            paths += inner
        else:
            raise UsageError(f"--checkpoints {item}: no such file or folder")
    return list(dict.fromkeys(paths))


def resolve_targets(model: nn.Module, spec: str) -> str | list[nn.Module]:
    """``"auto"``, or the submodules named in the comma-separated ``spec``."""
    if spec == "auto":
        return "auto"
    modules = []
    for name in (n.strip() for n in spec.split(",")):
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as err:
            near = [n for n, _ in model.named_modules() if n and name.split(".")[-1] in n][:5]
            raise UsageError(
                f"--target-modules: {type(model).__name__} has no submodule {name!r}"
                + (f"; similar names: {near}" if near else "")
                + " (`sdi info --model ...` shows the looped core found automatically)"
            ) from err
    return modules


def load_batches(
    path: str,
    *,
    text_field: str | None,
    ids_field: str | None,
    tokenizer: Any,
    max_length: int | None,
    min_length: int,
    batch_size: int,
    device: str,
) -> tuple[Batches, dict[str, Any]]:
    """Padded batches of a data file or folder, and a description of them for the results."""
    records = read_records(path)
    tokenize = None
    if text_field is not None and tokenizer is not None:

        def tokenize(text: str) -> list[int]:
            return tokenizer(text)["input_ids"]

    examples = token_ids(
        records,
        source=str(path),
        text_field=text_field,
        ids_field=ids_field,
        tokenize=tokenize,
        max_length=max_length,
        min_length=min_length,
    )
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    texts = [record[text_field] for record in records] if text_field is not None else None
    batches = Batches(examples, batch_size, pad if pad is not None else 0, device, texts=texts)
    return batches, {
        "path": str(path),
        "examples": len(examples),
        "field": text_field if text_field is not None else ids_field,
        "tokenised": text_field is not None,
    }
