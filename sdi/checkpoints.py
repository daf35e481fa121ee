"""Checkpoints: what to load and how much each counts (``eta_k``).

A checkpoint file is a dict holding ``model_state_dict``, or ``state_dict``, or is itself a state dict.
Its weight, when :class:`CheckpointSpec` gives none, is the learning rate in
``optimizer_state_dict["param_groups"][0]["lr"]``, else 1.0.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint path and its TracIn weight ``eta_k`` (``None``: read it from the checkpoint)."""

    path: str | Path
    weight: float | None = None


def default_load_checkpoint(
    checkpoint_path: str | Path, *, map_location: str = "cpu"
) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only (safe)."""
    try:
        return torch.load(str(checkpoint_path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{checkpoint_path}: the checkpoint holds pickled Python objects, which sdi does not load "
            "by default (weights_only=True). If you trust the file, pass "
            "load_checkpoint_fn=lambda p: torch.load(p, map_location='cpu', weights_only=False)."
        ) from err


def default_load_model_state_dict(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Load ``model_state_dict``, else ``state_dict``, else the checkpoint itself, into ``model``."""
    for key in ("model_state_dict", "state_dict"):
        if key in checkpoint:
            model.load_state_dict(checkpoint[key])
            return
    model.load_state_dict(checkpoint)


def default_eta_from_checkpoint(checkpoint: dict[str, Any], *, fallback: float = 1.0) -> float:
    """The first parameter group's learning rate, if the checkpoint stores an optimizer; else ``fallback``."""
    optimizer = checkpoint.get("optimizer_state_dict")
    if isinstance(optimizer, dict):
        groups = optimizer.get("param_groups")
        if isinstance(groups, (list, tuple)) and groups and isinstance(groups[0], dict):
            lr = groups[0].get("lr")
            if lr is not None:
                try:
                    return float(lr)
                except (TypeError, ValueError):
                    pass
    return float(fallback)
