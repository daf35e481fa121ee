"""The command line's default loss: per-example next-token cross-entropy of a causal LM.

``causal_lm_loss(model, batch)`` with ``batch = {"input_ids": (B, T), "attention_mask": (B, T)}``
(:class:`sdi.data.Batches`) returns ``(B,)``: for each example the mean cross-entropy of predicting
token ``t + 1`` from tokens ``<= t``, over the positions where both tokens are real (mask 1), so
padding changes nothing. The model is called as

- ``model(input_ids=..., attention_mask=..., use_cache=False)`` when its ``forward`` takes those
  keywords (a ``transformers`` model; those it lacks are left out),
- else ``model(input_ids)``,

and its logits are the output itself, its ``.logits``, or its first element.

Your own loss: a function ``fn(model, batch) -> (B,)`` per-example losses (one per row of
``batch["input_ids"]``) in an importable module, passed as ``--loss package.module:fn``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def _keywords(model: nn.Module) -> set[str] | None:
    """The keyword names ``model.forward`` takes, or ``None`` if it takes ``**kwargs``."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """``(B, T, vocab)`` logits of ``model`` on ``input_ids`` (see the module docstring)."""
    names = _keywords(model)
    if names is None or "input_ids" in names:
        kwargs = {"input_ids": input_ids}
        for key, value in (("attention_mask", attention_mask), ("use_cache", False)):
            if names is None or key in names:
                kwargs[key] = value
        out = model(**kwargs)
    else:
        out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over real (unpadded) positions: ``(B,)``."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    logits = logits_of(model, input_ids, mask)
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"the model's logits have shape {tuple(logits.shape)}, not (B, T, vocab) for input_ids "
            f"{tuple(input_ids.shape)}: the default loss is for causal LMs; pass --loss "
            "package.module:fn for another model"
        )
    targets = input_ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).float()  # both tokens real
    per_token = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, reduction="none"
    )  # (B, T - 1)
    return (per_token * valid).sum(1) / valid.sum(1).clamp_min(1)
