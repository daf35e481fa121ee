"""Checkpoints: what to load and how much each counts (``eta_k``).

What :func:`default_load_checkpoint` reads (every format without running pickled code):

- a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ...) loaded with ``weights_only=True``: a dict
  holding ``model_state_dict``, or ``state_dict``, or itself a state dict;
- a bare ``.safetensors`` file (recognised by its suffix or its header);
- a Trainer checkpoint folder (``checkpoint-500/`` as ``transformers.Trainer`` or
  ``save_pretrained`` write it): ``model.safetensors``, else a sharded
  ``model.safetensors.index.json``, else ``pytorch_model.bin``, else a sharded
  ``pytorch_model.bin.index.json``. Its weights come back as ``{"model_state_dict": ...}``.

A file that cannot be read is told apart by kind: empty, truncated / corrupt, not a checkpoint at
all (:class:`CorruptCheckpointError`), or one that really holds pickled Python objects
(:class:`PickledCheckpointError`, the only one that mentions the ``weights_only=False`` opt-in).

The weight ``eta_k`` of a :class:`CheckpointSpec` with ``weight=None``, first source that has it
(:func:`eta_and_source` tells which one was used):

1. a checkpoint folder's ``trainer_state.json``: the ``learning_rate`` logged in ``log_history``
   at the folder's ``global_step``. Trainer logs every ``logging_steps``, so when that exact step
   has no entry the nearest logged step before it is used; none at or before it: next source;
2. the optimizer state: ``optimizer_state_dict`` of a dict checkpoint, else a folder's
   ``optimizer.pt`` (loaded with ``weights_only=True``): its first parameter group's ``lr``;
3. 1.0.

Weights and stored learning rates must be finite real numbers; anything else (NaN, inf, a string)
is an error naming the checkpoint, never a silent 1.0. How the loaded weights go into the model
(wrappers, key prefixes, tied weights, mismatches) is :mod:`sdi.state_dicts`;
:func:`load_checkpoint_into` names the checkpoint (its index and path) in its errors.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .state_dicts import MISMATCH_FIX, CheckpointMismatchError, CheckpointWarning
from .state_dicts import default_load_model_state_dict as default_load_model_state_dict
from .validation import warn_outside_package

FOLDER_WEIGHT_FILES = (  # in the order a folder is searched, as transformers does
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_TRUST_HINT = (
    "If you trust the file, pass "
    "load_checkpoint_fn=lambda p: torch.load(p, map_location='cpu', weights_only=False)."
)


class CorruptCheckpointError(ValueError):
    """The file is empty, truncated, damaged or no checkpoint at all (nothing to opt in to)."""


class PickledCheckpointError(RuntimeError):
    """The file is a valid checkpoint that holds pickled Python objects besides tensors."""


def _finite(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite real number (or a one-element tensor), else raise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a finite real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite real number, got {number}")
    return number


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint path and its TracIn weight ``eta_k`` (``None``: read it from the checkpoint).

    ``path``: a ``torch.save`` file, a ``.safetensors`` file, or a Trainer checkpoint folder (or
    whatever a custom ``load_checkpoint_fn`` takes). ``weight``, when given, must be finite.
    """

    path: str | Path
    weight: float | None = None

    def __post_init__(self) -> None:
        if self.weight is not None:
            _finite(self.weight, f"CheckpointSpec({str(self.path)!r}).weight")


def as_checkpoint_specs(checkpoints: Any) -> list[CheckpointSpec]:
    """The ``checkpoints`` argument as a non-empty list of :class:`CheckpointSpec`.

    Items may be specs or paths (``str`` / ``os.PathLike``, taken as ``CheckpointSpec(path)``:
    eta from the checkpoint). A single path or spec, a mapping, other item types and an empty list
    are refused with the reason.
    """
    if isinstance(checkpoints, (str, bytes, os.PathLike, CheckpointSpec)):
        raise TypeError(
            f"checkpoints must be a list of CheckpointSpec or paths, got a single "
            f"{type(checkpoints).__name__}: pass checkpoints=[{checkpoints!r}]"
        )
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, Iterable):
        raise TypeError(
            "checkpoints must be a list of CheckpointSpec or paths, got "
            f"{type(checkpoints).__name__}"
        )
    specs = []
    for i, item in enumerate(checkpoints):
        if isinstance(item, CheckpointSpec):
            specs.append(item)
        elif isinstance(item, (str, os.PathLike)):
            specs.append(CheckpointSpec(item))
        else:
            raise TypeError(
                f"checkpoints[{i}] must be a CheckpointSpec or a path (str / os.PathLike), got "
                f"{type(item).__name__}: {item!r}"
            )
    if not specs:
        raise ValueError("no checkpoints given: pass at least one CheckpointSpec or path")
    return specs


class LoadedCheckpoint(dict):
    """What :func:`default_load_checkpoint` returns: the checkpoint's dict, unchanged in its keys,
    plus where it came from as attributes (not keys, so strict state-dict loading never sees them).

    ``path``: the file or folder loaded; ``folder``: the Trainer checkpoint folder, or ``None``
    for a single file (a folder's ``trainer_state.json`` and ``optimizer.pt`` are read from it
    only when the weight is asked for, by :func:`eta_and_source`).
    """

    def __init__(self, content: dict, *, path: str | Path, folder: Path | None = None):
        super().__init__(content)
        self.path = str(path)
        self.folder = folder
        metadata = getattr(content, "_metadata", None)  # a bare state dict's module versions
        if metadata is not None:
            self._metadata = metadata


def default_load_checkpoint(
    checkpoint_path: str | Path, *, map_location: str = "cpu"
) -> dict[str, Any]:
    """Load a ``torch.save`` file (``weights_only=True``), a ``.safetensors`` file or a Trainer
    checkpoint folder (see the module docstring) into a :class:`LoadedCheckpoint` dict."""
    path = Path(checkpoint_path)
    if path.is_dir():
        return LoadedCheckpoint(
            {"model_state_dict": _load_folder_weights(path, map_location)}, path=path, folder=path
        )
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_path}: no such checkpoint file or folder")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return LoadedCheckpoint(
            {"model_state_dict": _load_safetensors(path, map_location)}, path=path
        )
    loaded = load_torch_file(path, map_location=map_location)
    return LoadedCheckpoint(loaded, path=path) if isinstance(loaded, dict) else loaded


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors header: 8-byte little-endian length, then a JSON object of that length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except SafetensorError as err:
        raise CorruptCheckpointError(
            f"{path}: corrupt or truncated safetensors file ({path.stat().st_size} bytes): {err}"
        ) from err


def _load_folder_weights(folder: Path, map_location: str) -> dict[str, torch.Tensor]:
    """The model weights of a Trainer checkpoint folder, from the first file found of
    :data:`FOLDER_WEIGHT_FILES`; a sharded index's shards are merged."""
    for name in FOLDER_WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name == "model.safetensors":
            return _load_safetensors(file, map_location)
        if name == "pytorch_model.bin":
            return load_torch_file(file, map_location=map_location)
        return _load_sharded(file, map_location)
    inside = sorted(p.name for p in folder.iterdir())
    hint = ""
    if any(n.startswith("checkpoint-") for n in inside):
        hint = " It holds checkpoint-* folders: pass those, one CheckpointSpec each."
    raise FileNotFoundError(
        f"{folder}: a folder but not a checkpoint folder: none of {', '.join(FOLDER_WEIGHT_FILES)} "
        f"in it (it holds {inside[:10]}{' ...' if len(inside) > 10 else ''}).{hint}"
    )


def _load_sharded(index_file: Path, map_location: str) -> dict[str, torch.Tensor]:
    """Merge the shards named by a ``*.index.json`` (``{"weight_map": {key: shard file}}``)."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(
            f"{index_file}: not a valid shard index (a JSON object with a weight_map): {err}"
        ) from err
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = index_file.parent / shard
        if not file.is_file():
            raise FileNotFoundError(f"{index_file}: its shard {shard} is missing")
        part = (
            _load_safetensors(file, map_location)
            if file.suffix == ".safetensors"
            else load_torch_file(file, map_location=map_location)
        )
        wanted = {k for k, v in weight_map.items() if v == shard}
        if not wanted <= part.keys():
            missing = sorted(wanted - part.keys())
            raise CorruptCheckpointError(
                f"{file}: lacks {len(missing)} tensor(s) the index {index_file.name} places in "
                f"it, e.g. {missing[:3]}"
            )
        state.update({k: part[k] for k in wanted})
    return state


def load_torch_file(path: str | Path, *, map_location: str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with a failure told apart by its cause:
    :class:`CorruptCheckpointError` (empty, truncated, damaged, not a checkpoint) or
    :class:`PickledCheckpointError` (a valid file holding pickled objects: the opt-in hint)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip = head.startswith(b"PK")
    if is_zip:
        pickle_name = _zip_pickle_name(path, size)  # reads the archive's directory only
    elif head[:1] != b"\x80":  # neither zip nor a pickle protocol opcode (torch's legacy format)
        raise CorruptCheckpointError(f"{path}: not a checkpoint: {_describe_bytes(head)}")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            if is_zip:
                with zipfile.ZipFile(path) as archive:
                    pickle_bytes = archive.read(pickle_name)
            else:
                pickle_bytes = path.read_bytes()
        except (zipfile.BadZipFile, zlib.error, OSError):
            pickle_bytes = b""  # unreadable: reported as damaged below
        objects = _unsafe_globals(pickle_bytes, several=not is_zip)
        if objects is None:
            raise CorruptCheckpointError(
                f"{path}: corrupt or not a checkpoint ({size} bytes): its pickle is damaged"
            ) from err
        if not objects:
            raise CorruptCheckpointError(
                f"{path}: a pickle of no tensors torch.load can restore, not a torch.save checkpoint"
            ) from err
        raise PickledCheckpointError(
            f"{path}: the checkpoint holds pickled Python objects ({', '.join(objects[:5])}), "
            f"which sdi does not load by default (weights_only=True). {_TRUST_HINT}"
        ) from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, struct.error) as err:
        raise CorruptCheckpointError(
            f"{path}: corrupt or truncated checkpoint ({size} bytes): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def _describe_bytes(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return (
            f"neither a torch.save file nor safetensors (it begins with bytes {head[:8]!r}): "
            "corrupt, or another format"
        )
    return f"it holds text (begins {text[:40]!r})"


def _zip_pickle_name(path: Path, size: int) -> str:
    """The name of a ``torch.save`` zip archive's ``data.pkl``; a broken archive is an error."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
        raise CorruptCheckpointError(
            f"{path}: truncated or corrupt torch.save archive ({size} bytes): {err}"
        ) from err
    if not names:
        raise CorruptCheckpointError(
            f"{path}: a zip archive without data.pkl, not a torch.save checkpoint"
        )
    return names[0]


# Globals a weights_only load accepts without the user's opt-in (besides torch's own).
_SAFE_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.slice"}
_PUTS, _GETS = {"BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}, {"BINGET", "LONG_BINGET", "GET"}


def _unsafe_globals(data: bytes, *, several: bool) -> list[str] | None:
    """The non-torch globals the pickle(s) in ``data`` reference; ``None`` if the first is no
    valid pickle. ``several``: a legacy torch file holds a few pickles back to back, then raw
    storage bytes (where parsing stops)."""
    found: list[str] = []
    stream = io.BytesIO(data)
    for index in range(5 if several else 1):
        strings: list[str] = []  # string constants pushed: STACK_GLOBAL names the last two
        memo: dict[int, str] = {}
        last_pushed_string = False
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = None
                if op.name in _PUTS:
                    if last_pushed_string:
                        memo[len(memo) if arg is None else int(arg)] = strings[-1]
                    continue  # a memo store leaves the stack as it was
                if op.name in _GETS and int(arg) in memo:
                    strings.append(memo[int(arg)])
                elif isinstance(arg, str) and op.name != "GLOBAL":
                    strings.append(arg)
                elif op.name == "GLOBAL":
                    name = str(arg).replace(" ", ".", 1)
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                last_pushed_string = bool(strings) and (
                    op.name in _GETS or (isinstance(arg, str) and op.name != "GLOBAL")
                )
                unsafe = name and not name.startswith("torch.") and name not in _SAFE_GLOBALS
                if unsafe and name not in found:
                    found.append(name)
        except Exception:  # noqa: BLE001 - a parse failure: damaged, or past the last pickle
            if index == 0:
                return None
            return found
        if stream.tell() >= len(data):
            break
    return found


def _first_group_lr(optimizer: Any, where: str) -> float | None:
    """The first parameter group's ``lr`` of an optimizer state dict (validated), or ``None``."""
    if not isinstance(optimizer, dict):
        return None
    groups = optimizer.get("param_groups")
    if not (isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], dict)):
        return None
    lr = groups[0].get("lr")
    return None if lr is None else _finite(lr, f"the learning rate stored in {where}")


def _trainer_state_lr(file: Path) -> tuple[float, int] | None:
    """``(lr, step)``: the ``learning_rate`` logged at ``global_step``, or at the last logged step
    before it; ``None`` when none is logged at or before it."""
    try:
        state = json.loads(file.read_text())
        history = state.get("log_history", [])
        if not isinstance(history, list):
            raise TypeError("log_history is not a list")
    except (ValueError, AttributeError, TypeError) as err:
        raise CorruptCheckpointError(f"{file}: not a valid trainer state: {err}") from err

    def is_step(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    logged = [
        e
        for e in history
        if isinstance(e, dict) and "learning_rate" in e and is_step(e.get("step"))
    ]
    step = state.get("global_step")
    if is_step(step):
        logged = [e for e in logged if e["step"] <= step]
    if not logged:
        return None
    newest = max(e["step"] for e in logged)
    last = [e for e in logged if e["step"] == newest][-1]  # the last entry logged at that step
    lr = _finite(
        last["learning_rate"], f"the learning_rate logged at step {last['step']} in {file}"
    )
    return lr, int(last["step"])


def eta_and_source(checkpoint: dict[str, Any], *, fallback: float = 1.0) -> tuple[float, str]:
    """``(eta, where it came from)`` for one loaded checkpoint, in the order of the module
    docstring: trainer_state.json, the optimizer state, ``fallback``."""
    name = getattr(checkpoint, "path", "the checkpoint")
    folder = getattr(checkpoint, "folder", None)
    if folder is not None and (folder / TRAINER_STATE).is_file():
        found = _trainer_state_lr(folder / TRAINER_STATE)
        if found is not None:
            return found[0], f"{TRAINER_STATE} (learning_rate logged at step {found[1]})"
    lr = _first_group_lr(checkpoint.get("optimizer_state_dict"), f"{name} (optimizer_state_dict)")
    if lr is not None:
        return lr, "optimizer_state_dict"
    if folder is not None and (folder / OPTIMIZER_FILE).is_file():
        file = folder / OPTIMIZER_FILE
        lr = _first_group_lr(load_torch_file(file), str(file))
        if lr is not None:
            return lr, OPTIMIZER_FILE
    return _finite(fallback, "fallback"), "fallback"


def _as_checkpoint_dict(checkpoint: Any, where: str) -> dict[str, Any]:
    """What ``load_checkpoint_fn`` returned, as the dict the other two functions take: a whole
    pickled model (``torch.save(model)``, loaded with ``weights_only=False``) becomes its
    ``state_dict()``, with a :class:`CheckpointWarning`; anything else but a dict is refused."""
    if isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint, nn.Module):
        warn_outside_package(
            f"{where} is a whole pickled model ({type(checkpoint).__name__}): sdi loads its "
            "state_dict(). Saving model.state_dict() instead gives a smaller file that loads "
            "without running pickled code.",
            CheckpointWarning,
        )
        return LoadedCheckpoint({"model_state_dict": checkpoint.state_dict()}, path=where)
    raise TypeError(
        f"{where}: load_checkpoint_fn returned a {type(checkpoint).__name__}; sdi needs a dict "
        "(a state dict, or one holding 'model_state_dict') or a model. Save model.state_dict() "
        "or return one of those from load_checkpoint_fn."
    )


def load_checkpoint_into(
    model: nn.Module,
    spec: CheckpointSpec,
    load_checkpoint_fn: Callable[[Any], dict[str, Any]],
    load_model_state_dict_fn: Callable[[nn.Module, dict[str, Any]], None],
    eta_from_checkpoint_fn: Callable[[dict[str, Any]], float],
    index: int | None = None,
) -> float:
    """Load ``spec`` into ``model`` (then eval mode) and return its ``eta_k``, checked finite.

    ``spec.weight`` when given, else ``eta_from_checkpoint_fn`` of the loaded checkpoint -- a
    custom one's NaN or inf is an error naming the checkpoint, like a stored learning rate's.
    ``index``, the checkpoint's place in ``checkpoints``, names it in errors with its path: weights
    that do not fit the model (:class:`CheckpointMismatchError`, also for torch's own error from
    a custom ``load_model_state_dict_fn``).
    """
    where = (
        f"checkpoints[{index}] ({str(spec.path)!r})" if index is not None else repr(str(spec.path))
    )
    try:
        loaded = load_checkpoint_fn(spec.path)
    except (CorruptCheckpointError, PickledCheckpointError, FileNotFoundError) as err:
        if index is None:
            raise
        raise type(err)(f"checkpoints[{index}]: {err}") from err  # which of the list
    checkpoint = _as_checkpoint_dict(loaded, where)
    if spec.weight is not None:
        weight = float(spec.weight)
    else:
        weight = _finite(
            eta_from_checkpoint_fn(checkpoint), f"the weight (eta) of checkpoint {str(spec.path)!r}"
        )
    try:
        load_model_state_dict_fn(model, checkpoint)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{where}: {err}") from err
    except RuntimeError as err:
        if "state_dict" not in str(err):  # torch's "Error(s) in loading state_dict for ..."
            raise
        raise CheckpointMismatchError(
            f"{where}: its weights do not fit the model: {str(err).strip().rstrip('.')}. {MISMATCH_FIX}"
        ) from err
    model.eval()
    return weight


def default_eta_from_checkpoint(checkpoint: dict[str, Any], *, fallback: float = 1.0) -> float:
    """The learning rate of a loaded checkpoint, from the first source that has one (the module
    docstring lists them; :func:`eta_and_source` also says which), else ``fallback``."""
    return eta_and_source(checkpoint, fallback=fallback)[0]
