"""Putting a checkpoint's weights into the model, as people save them.

:func:`default_load_model_state_dict` finds the weights in a loaded checkpoint and loads them
strictly, after three repairs that cannot be wrong, each said with a :class:`CheckpointWarning`
where the user did not spell it out:

- the weights under one well-known key (:data:`STATE_DICT_KEYS`: ``{"model": ..., "epoch": 3}``),
  a dict of tensors or a pickled module;
- a prefix every key carries and the model lacks (:data:`WRAPPER_PREFIXES`: ``_orig_mod.`` from
  ``torch.compile``, ``module.`` from DDP);
- weights the file leaves out because the model ties them to a saved one (``save_pretrained``
  drops, e.g., ALBERT's ``predictions.decoder.weight``, tied to the word embeddings).

Anything else that differs -- keys missing or left over (an EMA copy), other shapes (another
architecture), several candidate keys -- is a :class:`CheckpointMismatchError` listing a few of
them and the fix (:data:`MISMATCH_FIX`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from .validation import warn_outside_package


def _tied_aliases(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus each key the model ties to a key in ``state`` (one shared tensor) that
    ``state`` leaves out, as ``save_pretrained`` does; ``state`` itself if none is missing."""
    own = model.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    if not missing:
        return state
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in own.items():
        by_tensor.setdefault(id(tensor), []).append(key)
    filled = OrderedDict(state)
    for key in missing:
        twin = next((k for k in by_tensor[id(own[key])] if k in state), None)
        if twin is not None:
            filled[key] = state[twin]
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        filled._metadata = metadata
    return filled


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's weights do not fit the model: keys missing or left over, or other shapes."""


class CheckpointWarning(UserWarning):
    """sdi read a checkpoint in a way the user did not spell out (a wrapper, a key prefix)."""


# Keys under which training scripts nest the model's weights, in the order they are tried.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network")
# Key prefixes a wrapper adds to every key: torch.compile's module, DistributedDataParallel.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_SHOWN = 5  # keys listed per kind of difference


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())
    )


def _nested_state(checkpoint: dict[str, Any]) -> tuple[Any, str | None]:
    """The model's weights in ``checkpoint`` and the key they were under (``None``: the dict
    itself). ``model_state_dict`` and ``state_dict`` first; then the one well-known key
    (:data:`STATE_DICT_KEYS`) holding a dict of tensors or a module; several such keys: refused."""
    for key in ("model_state_dict", "state_dict"):
        if key in checkpoint:
            return checkpoint[key], key
    if _is_tensor_dict(checkpoint):
        return checkpoint, None
    found = [
        k
        for k in STATE_DICT_KEYS
        if _is_tensor_dict(checkpoint.get(k)) or isinstance(checkpoint.get(k), nn.Module)
    ]
    if len(found) > 1:
        raise CheckpointMismatchError(
            f"the checkpoint holds weights under several keys {found}, so which one is the model "
            "is ambiguous. Pass load_model_state_dict_fn=lambda model, ckpt: "
            f"model.load_state_dict(ckpt[{found[0]!r}]) (with the key you mean)."
        )
    if not found:
        return checkpoint, None
    return checkpoint[found[0]], found[0]


def _strip_prefix(model: nn.Module, state: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``state`` without a wrapper's prefix on every key (``torch.compile``'s ``_orig_mod.``,
    DDP's ``module.``) when no key of the model has it; else ``state`` as it is."""
    own = model.state_dict().keys()
    for prefix in WRAPPER_PREFIXES:
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not any(k.startswith(prefix) for k in own)
        ):
            stripped = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
            metadata = getattr(state, "_metadata", None)
            if metadata is not None:
                stripped._metadata = OrderedDict(
                    (k[len(prefix) :] if k.startswith(prefix) else k, v)
                    for k, v in metadata.items()
                )
            return stripped, prefix
    return state, None


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def _mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """What keeps ``state`` from loading strictly into ``model`` (missing keys, left-over keys,
    other shapes), or ``None``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape
    ]
    not_tensors = [k for k in own if k in state and not torch.is_tensor(state[k])]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of the model's keys are not in the checkpoint: {_listed(missing)}"
        )
    if extra:
        heads = sorted({k.split(".")[0] for k in extra})
        problems.append(
            f"{len(extra)} keys of the checkpoint are not in the model: {_listed(extra)} "
            f"(under {_listed(heads)}: an EMA copy or another head left in?)"
        )
    if shapes:
        problems.append(
            f"{len(shapes)} shapes differ: {_listed(shapes)} (saved from another architecture or "
            "config? build the model the checkpoint was trained with)"
        )
    if not_tensors:
        problems.append(f"not tensors: {_listed(not_tensors)}")
    prefix = _shared_prefix(state, own)
    if prefix is not None:
        problems.append(
            f"every key of the checkpoint carries the prefix {prefix!r}, and without it they are "
            "the model's keys: pass load_model_state_dict_fn=lambda model, ckpt: "
            f"model.load_state_dict({{k.removeprefix({prefix!r}): v for k, v in <the weights>"
            ".items()})"
        )
    return "; ".join(problems) or None


def _shared_prefix(state: dict[str, Any], own: dict[str, Any]) -> str | None:
    """The first key component every key of ``state`` carries (a LightningModule's ``model.``)
    if removing it gives exactly the model's keys, else ``None``."""
    first = {k.split(".", 1)[0] for k in state}
    if len(first) != 1 or not all("." in k for k in state):
        return None
    prefix = f"{first.pop()}."
    return prefix if {k[len(prefix) :] for k in state} == set(own) else None


MISMATCH_FIX = (
    "Fix the checkpoint or the model, or pass load_model_state_dict_fn=(a function "
    "(model, checkpoint) that loads it: picks, renames or drops keys, e.g. lambda model, ckpt: "
    "model.load_state_dict(ckpt['ema']); strict=False only if you know the missing weights do "
    "not matter), or load_checkpoint_fn= to read another file format."
)


def default_load_model_state_dict(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Load the checkpoint's model weights into ``model``, strictly.

    The weights are ``model_state_dict``, else ``state_dict``, else the single well-known key
    (:data:`STATE_DICT_KEYS`: ``model``, ``module``, ...) holding a dict of tensors or a pickled
    module, else the checkpoint itself. A prefix every key carries and the model lacks
    (``_orig_mod.`` from ``torch.compile``, ``module.`` from DDP) is removed, and weights left out
    because the model ties them to a saved one are restored; the first two say so
    (:class:`CheckpointWarning`). Keys that still differ, or other shapes, raise
    :class:`CheckpointMismatchError` listing some of them and the fix.
    """
    state, key = _nested_state(checkpoint)
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise CheckpointMismatchError(
            f"the checkpoint's weights are a {type(state).__name__}, not a state dict "
            "(a dict of tensors). Save model.state_dict(), or pass load_model_state_dict_fn=."
        )
    done = []
    if key not in (None, "model_state_dict", "state_dict"):
        others = [k for k in checkpoint if k != key]
        done.append(f"took the weights under the key {key!r} (ignoring {_listed(others)})")
    state, prefix = _strip_prefix(model, state)
    if prefix is not None:
        done.append(f"removed the prefix {prefix!r} from every key")
    state = _tied_aliases(model, state)
    problem = _mismatch(model, state)
    if problem is not None:
        raise CheckpointMismatchError(
            f"its weights do not fit the model: {problem}. {MISMATCH_FIX}"
        )
    if done:
        where = getattr(checkpoint, "path", "the checkpoint")
        warn_outside_package(f"{where}: {' and '.join(done)}", CheckpointWarning)
    model.load_state_dict(state)
