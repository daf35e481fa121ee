"""``nn.Embedding``: ``phi = sum_tokens onehot(id) (x) g``, sketched by a signed shift (no FFT)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..sketch import draw_tensor_sketch
from .linear import tokens
from .registry import ModuleRule, Use


def ids_and_grads(module: nn.Embedding, use: Use) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, T)`` and grad-outputs ``(B, T, d)``, padding tokens' grads zeroed."""
    ids = use.activations[0]
    ids = ids.reshape(ids.shape[0], -1).long()
    g = tokens(use.grad)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


class EmbeddingRule(ModuleRule):
    def check(self, module, param, *, exact: bool) -> str | None:
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True has no per-example gradient rule"
        return None

    def draw_table(self, module, param, m, generator):
        return draw_tensor_sketch(param.shape[0], param.shape[1], m, generator)

    def grads(self, module, params, use: Use) -> list[torch.Tensor]:
        ids, g = ids_and_grads(module, use)
        B = use.batch
        rows = ids + module.num_embeddings * torch.arange(B, device=ids.device).unsqueeze(1)
        dense = torch.zeros(B * module.num_embeddings, g.shape[-1], device=g.device)
        dense.index_add_(0, rows.reshape(-1), g.reshape(-1, g.shape[-1]).float())
        return [dense.reshape(B, -1)]

    def sketch(self, rules, module, params, use: Use) -> list[torch.Tensor]:
        ids, g = ids_and_grads(module, use)
        return [rules.backend.tensor_sketch_embedding(ids, g, rules.tables[params[0]])]

    def add_step(self, sums, module, params, use: Use) -> None:
        sums.add_sketch(params[0], self.sketch(sums.rules, module, params, use)[0])
