"""The looped GPT of the paper's accuracy experiment (arXiv 2602.10097), with its open choices.

What the paper states: 2 prelude + 4 recurrent + 2 coda GPT-2 blocks, d = 768, 12 heads, biases,
an input-injection adapter at every loop step, an untied head, vocab 50304, tau = 32 loop steps,
sequences of 128 tokens, FP32, random initialisation with std 0.02, 135.1M parameters.

What it leaves open, each a constructor argument (the default first):

- ``positions``: ``"learned"`` absolute positions added to the token embedding (GPT-2), or
  ``"none"`` (no positional signal besides the causal mask).
- ``loop_start``: the recurrent state before step 1: ``"prelude"`` (the prelude's output),
  ``"zeros"``, or ``"noise"`` (a fixed N(0, 1) draw per position, seeded, so that every forward
  of the same tokens is the same function: the oracle and the estimators see one model).
- ``adapter``: the injection at the start of every loop step: ``"concat"``,
  ``Linear(2d -> d)(concat(state, prelude_out))``, or ``"add"``, ``state + Linear(d -> d)(prelude_out)``.

The forward is split into :meth:`PaperLoopedGPT.embed`, :meth:`start`, :meth:`inject` and
:meth:`readout` around the loop over ``recurrent`` so that the exact oracle (``oracle.py``) runs the
same model with its own parameter copies in the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class PaperConfig:
    vocab: int = 50304
    d_model: int = 768
    n_heads: int = 12
    prelude: int = 2
    recurrent: int = 4
    coda: int = 2
    loop_steps: int = 32
    seq_len: int = 128
    positions: str = "learned"
    loop_start: str = "prelude"
    adapter: str = "concat"

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


CHOICES = {
    "positions": ("learned", "none"),
    "loop_start": ("prelude", "zeros", "noise"),
    "adapter": ("concat", "add"),
}


class GPT2Block(nn.Module):
    """Pre-norm GPT-2 block: 12 parameter tensors (2 LayerNorms, 4 Linears, each weight and bias)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(B, T, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attn.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PaperLoopedGPT(nn.Module):
    """``tokens (B, T)`` -> logits ``(B, T, vocab)``; pass ``model.recurrent`` as ``target_modules``
    (its 4 blocks run once per loop step: SDI has ``loop_steps`` steps)."""

    def __init__(self, config: PaperConfig):
        super().__init__()
        for name, allowed in CHOICES.items():
            if getattr(config, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
        self.config = config
        self.loop_steps = config.loop_steps
        d, h = config.d_model, config.n_heads
        self.wte = nn.Embedding(config.vocab, d)
        self.wpe = nn.Embedding(config.seq_len, d) if config.positions == "learned" else None
        self.prelude = nn.ModuleList(GPT2Block(d, h) for _ in range(config.prelude))
        self.adapter = nn.Linear(2 * d if config.adapter == "concat" else d, d)
        self.recurrent = nn.ModuleList(GPT2Block(d, h) for _ in range(config.recurrent))
        self.coda = nn.ModuleList(GPT2Block(d, h) for _ in range(config.coda))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab, bias=False)  # untied from wte
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every weight matrix and embedding N(0, 0.02); biases 0; LayerNorms (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prelude's output ``e (B, T, d)``, injected at every loop step."""
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.prelude:
            x = block(x)
        return x

    def start(self, e: torch.Tensor) -> torch.Tensor:
        """The state before the first loop step."""
        if self.config.loop_start == "prelude":
            return e
        if self.config.loop_start == "zeros":
            return torch.zeros_like(e)
        noise = torch.randn(e.shape[1:], generator=torch.Generator().manual_seed(1234))
        return noise.to(e.device).expand_as(e)

    def inject(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The adapter at the start of every loop step."""
        if self.config.adapter == "concat":
            return self.adapter(torch.cat([state, e], dim=-1))
        return state + self.adapter(e)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        for block in self.coda:
            state = block(state)
        return self.head(self.ln_f(state))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        state = self.start(e)
        for _ in range(self.loop_steps):
            state = self.inject(state, e)
            for block in self.recurrent:
                state = block(state)
        return self.readout(state)


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy ``(B,)``; ``batch`` is ``{"tokens": (B, T)}``."""
    tokens = batch["tokens"]
    logits = model(tokens)[:, :-1]
    targets = tokens[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return per_token.view(targets.shape).mean(dim=1)


def random_sequences(n: int, config: PaperConfig, seed: int, device="cpu") -> torch.Tensor:
    """``(n, seq_len)`` uniformly random tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab, (n, config.seq_len), generator=gen).to(device)


def build(config: PaperConfig, seed: int = 0, device="cpu") -> PaperLoopedGPT:
    torch.manual_seed(seed)
    return PaperLoopedGPT(config).to(device).eval()
