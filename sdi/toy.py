"""A small looped (weight-tied) transformer, its loss and random data: for the demo, tests and benches.

``LoopedTransformer``: token embedding + learned positions, then one :class:`LoopedBlock` applied
``loop_steps`` times with shared weights, then a bias-free Linear head. The block is causal
self-attention (bias-free ``qkv`` and ``proj`` Linears) with a residual, then a layer norm and an MLP
(``fc1`` -> GELU -> ``fc2``, with biases) with a residual. Pass ``model.core`` as ``target_modules``:
its parameters are used once per loop step, so SDI has ``loop_steps`` steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoopedBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, norm_affine: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model, elementwise_affine=norm_affine)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class LoopedTransformer(nn.Module):
    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 128,
        n_heads: int = 4,
        loop_steps: int = 8,
        max_len: int = 64,
        norm_affine: bool = False,
    ):
        super().__init__()
        self.loop_steps = loop_steps
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.core = LoopedBlock(d_model, n_heads, norm_affine=norm_affine)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for _ in range(self.loop_steps):
            x = self.core(x)
        return self.head(x)


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-example mean next-token cross-entropy ``(B,)``; ``batch`` is ``{"tokens": (B, T)}``."""
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    tokens = tokens.to(next(model.parameters()).device)
    logits = model(tokens)[:, :-1]
    targets = tokens[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return per_token.view(targets.shape).mean(dim=1)


def random_token_batches(
    n: int, batch_size: int, seq_len: int, vocab: int, seed: int
) -> list[dict]:
    """``n`` random token sequences as a list of ``{"tokens": (b, seq_len)}`` batches (a simple loader)."""
    tokens = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": tokens[i : i + batch_size]} for i in range(0, n, batch_size)]
