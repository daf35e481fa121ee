"""A small modern looped LM for tests: every construct of issue 11 in its loop layers.

Each of ``layers`` runs once per pass, for ``passes`` passes. A layer holds an RMSNorm subclass with
its own forward and weight, attention whose module owns a per-head scale ``(H, d_h)`` and a
relative-position bias table ``(H, 2 T - 1)`` besides its ``nn.Linear`` projections (called with a
keyword ``mask``), an attention residual over depth with its own query vector ``(d,)`` (called
with a keyword tuple of tensors), a depthwise ``nn.Conv1d``, an MoE block with a router ``(E, d)``
and 3-D expert banks ``(E, d, 2f)`` / ``(E, f, d)`` under top-k routing, and a message gate
``nn.Linear`` that acts only from the second pass on. Random weights, CPU-sized.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OffsetRMSNorm(nn.RMSNorm):
    """``x / rms(x) * (1 + weight)``: a subclass with its own forward (no Opacus sampler fits it)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d)
        self.head_scale = nn.Parameter(1 + 0.1 * torch.randn(heads, d // heads))
        self.rel_bias = nn.Parameter(0.1 * torch.randn(heads, 2 * max_len - 1))
        self.max_len = max_len

    def forward(self, x, *, mask):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        q = q * self.head_scale
        pos = torch.arange(T, device=x.device)
        bias = self.rel_bias[:, (pos[:, None] - pos[None, :]) + self.max_len - 1]  # (H, T, T)
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / (d // self.heads) ** 0.5 + bias
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.einsum("bhqk,bkhc->bqhc", scores.softmax(-1), v).reshape(B, T, d)
        return self.out(y)


class MoE(nn.Module):
    def __init__(self, d: int, f: int, experts: int, k: int):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, d) / d**0.5)
        self.up = nn.Parameter(torch.randn(experts, d, 2 * f) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, f, d) / f**0.5)
        self.k = k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = (flat @ self.router.t()).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.router.shape[0]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                gate, up = (flat[rows] @ self.up[e]).chunk(2, dim=-1)
                h = (F.silu(gate) * up) @ self.down[e]
                out = out.index_add(0, rows, h * weights[rows, slot, None])
        return out.reshape(x.shape)


class DepthAttention(nn.Module):
    """Attention residual over depth: mixes ``x`` with earlier states by a learned query ``(d,)``.
    The earlier states come as a keyword tuple of tensors."""

    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(d) / d**0.5)

    def forward(self, x, *, history: tuple[torch.Tensor, ...]):
        states = torch.stack((x, *history), dim=-2)  # (B, T, S, d)
        weights = (states @ self.query).softmax(-1)  # (B, T, S)
        return (weights.unsqueeze(-1) * states).sum(-2)


class LoopLayer(nn.Module):
    def __init__(self, d: int, heads: int, max_len: int, experts: int, k: int):
        super().__init__()
        self.gate = nn.Linear(d, d)  # message gate: from the second pass on
        self.norm1 = OffsetRMSNorm(d)
        self.attn = Attention(d, heads, max_len)
        self.norm2 = OffsetRMSNorm(d)
        self.conv = nn.Conv1d(d, d, 3, padding=1, groups=d)
        self.norm3 = OffsetRMSNorm(d)
        self.moe = MoE(d, d, experts, k)
        self.depth = DepthAttention(d)

    def forward(self, x, pass_index: int, *, mask):
        if pass_index > 0:
            x = x * torch.sigmoid(self.gate(x))
        x = self.depth(x + self.attn(self.norm1(x), mask=mask), history=(x,))
        x = x + self.conv(self.norm2(x).transpose(1, 2)).transpose(1, 2)
        return x + self.moe(self.norm3(x))


class LoopedLM(nn.Module):
    def __init__(
        self,
        vocab: int = 23,
        d: int = 16,
        heads: int = 2,
        layers: int = 2,
        passes: int = 3,
        max_len: int = 8,
        experts: int = 4,
        k: int = 2,
    ):
        super().__init__()
        self.passes = passes
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LoopLayer(d, heads, max_len, experts, k) for _ in range(layers))
        self.norm = OffsetRMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        mask = torch.ones(max_len, max_len, dtype=torch.bool).tril()[None]  # (1, T, T)
        self.register_buffer("mask", mask, persistent=False)
        with torch.no_grad():  # non-trivial norm weights
            for name, p in self.named_parameters():
                if name.endswith("weight") and p.dim() == 1:
                    p.add_(0.2 * torch.randn_like(p))

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.embed(tokens)
        mask = self.mask[:, :T, :T]
        for p in range(self.passes):
            for layer in self.layers:
                x = layer(x, p, mask=mask)
        return self.head(self.norm(x))


def next_token_losses(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropies ``(B, T - 1)`` of ``tokens (B, T)`` under ``model``'s logits."""
    logits = model(tokens)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-example mean next-token cross entropy ``(B,)`` of ``batch["tokens"]`` (B, T)."""
    return next_token_losses(model, batch["tokens"]).mean(1)


def per_example_grads(model: nn.Module, params, loss_fn, batches) -> torch.Tensor:
    """Plain autograd, one example at a time, in eval mode: ``(N, P)`` flattened over ``params``
    (zero for a parameter an example does not reach, as an MoE expert it is not routed to).
    A batch is a dict of tensors or one tensor, the examples along dimension 0."""
    rows = []
    for batch in batches:
        first = next(iter(batch.values())) if isinstance(batch, dict) else batch
        for i in range(first.shape[0]):
            if isinstance(batch, dict):
                one = {k: v[i : i + 1] for k, v in batch.items()}
            else:
                one = batch[i : i + 1]
            grads = torch.autograd.grad(loss_fn(model, one).sum(), params, allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
            ]
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    """``|got - want| <= rel * |want|`` in the Frobenius norm: float32 noise through a deep loop is
    ~1e-5 relative to the whole tensor, not to each (possibly tiny) entry."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def one_thread():
    """Run the caller's tiny-op tests on one intra-op thread (restored after): on a loaded machine
    two threads spin-waiting on ops of a few microseconds cost several times the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
