"""Small looped LMs that compute with their parameters in the ways of issue 18 (DESIGN.md section 9).

Each model is a next-token LM over ``tokens (B, T)`` returning logits ``(B, T, vocab)``, built
from scratch with odd sizes, random weights, eval mode; ``lm_loss`` is the per-example loss:

- ``FunctionalChildLM`` (a): the looped block calls its children's weights functionally
  (``F.conv1d(h, self.conv.weight, ...)``, ``F.linear(h, self.proj.weight, ...)``); the children's
  own ``forward`` never runs.
- ``LoopedGPT`` (b, g, speed bench): a speed-run style GPT block looped ``tau`` times, built from
  ``CastedLinear`` (``F.linear(x, self.weight.to(x.dtype), ...)``) or ``nn.Linear``, with per-block
  vectors multiplied into activations (``attn_scale``, ``mlp_scale``, ``resid_mix``, per-head
  ``q_gain``).
- ``BankUNetGPT`` (c): every layer's matrices in 3-D parameter banks on the model, sliced per
  layer and passed into the blocks; encoder layers store skips, a band of two layers runs three
  times, decoder layers add the skips back with learned weights.
- ``TiedLM`` (d): the embedding matrix used again by a head module through ``F.linear``.
- ``ArgumentLM`` (e): a bank slice ``(d, d)``, a vector ``(d,)`` and rotary tables ``(T, d/2)``
  passed to the looped blocks as arguments, so that a batch size can equal ``d`` or ``T``.
- ``EncoderLayerLM`` (f): a looped ``nn.TransformerEncoderLayer``.
- ``KeywordLM`` (h): a block that calls its ``nn.Linear`` as ``self.qkv(input=x)``, and optionally
  holds a ``weight_norm``-parametrised Linear, or normalises a weight inline before ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from looped_lm import lm_loss  # noqa: F401  (the models' loss, imported from here by tests and bench)
from torch.nn.utils.parametrizations import weight_norm

VOCAB, SEQ, D, HEADS, FF = 23, 7, 12, 3, 20


class CastedLinear(nn.Linear):
    """A Linear whose weight is cast to the activations' dtype at every call (speed-run GPTs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, dh)`` each -> ``(B, T, H * dh)``, causal."""
    B, T, H, dh = q.shape
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return y.transpose(1, 2).reshape(B, T, H * dh)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


def _perturb(module: nn.Module, scale: float = 0.3) -> None:
    """Move 1-D parameters (scales, gains, norm weights) off their constant init, so that their
    gradients are not symmetric."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1 or p.shape[0] == 2:
                p.add_(scale * torch.randn_like(p))


# (a) ------------------------------------------------------------------------------------------


class FunctionalConvBlock(nn.Module):
    """Causal depthwise conv + gated projection + MLP; the parent calls ``conv`` and ``proj``
    through their weights (as ``causal_conv1d_fn(x, conv1d.weight.squeeze(1), conv1d.bias)``)."""

    def __init__(self, d: int, ff: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, kernel, groups=d, padding=kernel - 1)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.norm(x).transpose(1, 2)  # (B, d, T)
        w = self.conv.weight.squeeze(1)  # (d, kernel): the kernel-function layout
        y = F.conv1d(h, w.unsqueeze(1), self.conv.bias, padding=self.kernel - 1, groups=w.shape[0])
        y = y[..., :T].transpose(1, 2)  # causal: drop the right padding
        x = x + F.linear(F.silu(y), self.proj.weight, self.proj.bias)
        return x + self.down(F.gelu(self.up(x)))


class _CoreLM(nn.Module):
    """Embedding, ``make_core()`` applied ``tau`` times, RMS-normalised untied head (built in that
    order, so one seed gives the same weights)."""

    def __init__(self, make_core, tau: int):
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(VOCAB, D)
        self.core = make_core()
        self.head = nn.Linear(D, VOCAB, bias=False)
        _perturb(self.core)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for _ in range(self.tau):
            x = self.core(x)
        return self.head(_rms(x))


class FunctionalChildLM(_CoreLM):
    def __init__(self, tau: int = 3):
        super().__init__(lambda: FunctionalConvBlock(D, FF), tau)


# (b), (g) -------------------------------------------------------------------------------------


class GPTBlock(nn.Module):
    """Attention + squared-ReLU MLP with per-block vectors: ``resid_mix (2, d)`` mixes the stream
    with the embedding ``x0``, per-head ``q_gain (H,)``, ``attn_scale`` / ``mlp_scale (d,)``."""

    def __init__(self, d: int, heads: int, ff: int, linear: type[nn.Linear], vectors: bool):
        super().__init__()
        self.heads, self.vectors = heads, vectors
        self.qkv = linear(d, 3 * d, bias=False)
        self.proj = linear(d, d, bias=False)
        self.up = linear(d, ff)
        self.down = linear(ff, d, bias=False)
        if vectors:
            self.attn_scale = nn.Parameter(torch.ones(d))
            self.mlp_scale = nn.Parameter(torch.ones(d))
            self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
            self.q_gain = nn.Parameter(torch.full((heads,), 1.5))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        if self.vectors:
            x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        q, k, v = self.qkv(_rms(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        q, k = _rms(q), _rms(k)
        if self.vectors:
            q = q * self.q_gain[:, None].to(q.dtype)
        y = self.proj(causal_attention(q, k, v))
        x = x + (self.attn_scale * y if self.vectors else y)
        y = self.down(F.relu(self.up(_rms(x))).square())
        return x + (self.mlp_scale * y if self.vectors else y)


class LoopedGPT(nn.Module):
    """Embedding, one ``GPTBlock`` applied ``tau`` times, untied head. ``casted=True`` builds the
    block from ``CastedLinear``, else from ``nn.Linear`` (same parameters, same names)."""

    def __init__(
        self,
        *,
        casted: bool,
        vectors: bool = True,
        vocab: int = VOCAB,
        d: int = D,
        heads: int = HEADS,
        ff: int = FF,
        tau: int = 3,
    ):
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(vocab, d)
        self.core = GPTBlock(d, heads, ff, CastedLinear if casted else nn.Linear, vectors)
        self.head = nn.Linear(d, vocab, bias=False)
        _perturb(self.core)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = x0 = _rms(self.embed(tokens))
        for _ in range(self.tau):
            x = self.core(x, x0)
        return self.head(_rms(x))


# (c) ------------------------------------------------------------------------------------------


class BankBlock(nn.Module):
    """A block that owns only its vectors; its matrices come in as arguments (bank slices),
    used through ``F.linear``, ``@`` with a transposed slice, a cast, and ``torch.matmul``."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.q_gain = nn.Parameter(torch.full((heads,), 1.5))

    def forward(self, x, x0, q_w, k_w, v_w, o_w, up_w, down_w):
        B, T, d = x.shape
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        h = _rms(x)
        shape = (B, T, self.heads, d // self.heads)
        q = _rms(F.linear(h, q_w).view(shape)) * self.q_gain[:, None]
        k = _rms((h @ k_w.T).view(shape))
        v = F.linear(h, v_w.to(h.dtype)).view(shape)
        x = x + self.attn_scale * F.linear(causal_attention(q, k, v), o_w)
        u = torch.matmul(_rms(x), up_w.t())
        return x + self.mlp_scale * F.linear(F.relu(u).square(), down_w)


class BankUNetGPT(nn.Module):
    """``layers`` blocks whose matrices live in banks: ``qo_bank (2L, d, d)`` (q of layer ``i`` at
    ``i``, its output projection at ``L + i``), ``kv_bank (2L, d, d)``, ``up_bank (L, ff, d)``,
    ``down_bank (L, d, ff)``. Layers ``0 .. e-1`` (encoder) store skips; the band ``e, e+1`` runs
    ``band_passes`` times; the remaining layers (decoder) each add one skip back, last in first
    out, weighted by ``skip_weights``."""

    def __init__(self, layers: int = 6, band_passes: int = 3, d: int = D, ff: int = FF):
        super().__init__()
        self.L, self.band_passes = layers, band_passes
        enc = (layers - 2) // 2
        self.encoder, self.band = list(range(enc)), [enc, enc + 1]
        self.decoder = list(range(enc + 2, layers))
        self.embed = nn.Embedding(VOCAB, d)
        self.qo_bank = nn.Parameter(torch.randn(2 * layers, d, d) / d**0.5)
        self.kv_bank = nn.Parameter(torch.randn(2 * layers, d, d) / d**0.5)
        self.up_bank = nn.Parameter(torch.randn(layers, ff, d) / d**0.5)
        self.down_bank = nn.Parameter(torch.randn(layers, d, ff) / ff**0.5)
        self.blocks = nn.ModuleList(BankBlock(d, HEADS) for _ in range(layers))
        self.skip_weights = nn.Parameter(1 + 0.3 * torch.randn(len(self.decoder), d))
        self.head = nn.Linear(d, VOCAB, bias=False)
        _perturb(self.blocks)

    def layer(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        L = self.L
        return self.blocks[i](
            x,
            x0,
            q_w=self.qo_bank[i],
            k_w=self.kv_bank[i],
            v_w=self.kv_bank[L + i],
            o_w=self.qo_bank[L + i],
            up_w=self.up_bank[i],
            down_w=self.down_bank[i],
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = x0 = _rms(self.embed(tokens))
        skips = []
        for i in self.encoder:
            x = self.layer(i, x, x0)
            skips.append(x)
        for _ in range(self.band_passes):
            for i in self.band:
                x = self.layer(i, x, x0)
        for j, i in enumerate(self.decoder):
            x = x + self.skip_weights[j] * skips.pop()
            x = self.layer(i, x, x0)
        return self.head(_rms(x))

    def band_slices(self) -> dict[str, set[int]]:
        """Bank name -> the slice indices the band's blocks use."""
        L, band = self.L, self.band
        return {
            "qo_bank": {*band, *(L + i for i in band)},
            "kv_bank": {*band, *(L + i for i in band)},
            "up_bank": set(band),
            "down_bank": set(band),
        }


# (d) ------------------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """A readout with its own norm that computes logits with a weight passed in (the embedding)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(h), weight)


class TiedLM(nn.Module):
    def __init__(self, tau: int = 3):
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(VOCAB, D)
        self.core = GPTBlock(D, HEADS, FF, nn.Linear, vectors=False)
        self.head = TiedHead(D)
        _perturb(self.head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = x0 = self.embed(tokens)
        for _ in range(self.tau):
            x = self.core(x, x0)
        return self.head(x, self.embed.weight)


# (e) ------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, T, d)`` with tables ``cos, sin (T, d / 2)``."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class ArgumentBlock(nn.Module):
    """Mixes tokens causally (a running mean of the rotated stream), then a projection given as an
    argument ``w (d, d)``, a gain given as an argument ``scale (d,)``, its own gain ``gain (d,)``
    (a direct parameter: the module is no plain Linear container), and its own MLP."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, x, w, scale, cos, sin):
        T = x.shape[1]
        h = rotate(_rms(x), cos, sin)
        counts = torch.arange(1, T + 1, dtype=x.dtype, device=x.device)[:, None]
        h = h.cumsum(1) / counts  # causal running mean
        x = x + F.linear(h, w) * scale * self.gain
        return x + self.down(F.gelu(self.up(x)))


class ArgumentLM(nn.Module):
    """Two ``ArgumentBlock``s per pass, ``tau`` passes; block ``i`` gets ``bank[i] (d, d)``,
    ``scales[i] (d,)`` and the rotary tables ``(T, d / 2)`` as arguments."""

    def __init__(self, d: int, seq: int, tau: int = 3, ff: int = 9):
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(VOCAB, d)
        self.bank = nn.Parameter(torch.randn(2, d, d) / d**0.5)
        self.scales = nn.Parameter(1 + 0.3 * torch.randn(2, d))
        self.blocks = nn.ModuleList(ArgumentBlock(d, ff) for _ in range(2))
        self.head = nn.Linear(d, VOCAB, bias=False)
        freqs = 1.0 / (10.0 ** torch.arange(d // 2))
        angles = torch.arange(seq)[:, None] * freqs[None]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.embed(tokens)
        for _ in range(self.tau):
            for i, block in enumerate(self.blocks):
                x = block(x, self.bank[i], self.scales[i], self.cos[:T], self.sin[:T])
        return self.head(_rms(x))


# (f) ------------------------------------------------------------------------------------------


class EncoderLayerLM(nn.Module):
    """The textbook Universal Transformer: one ``nn.TransformerEncoderLayer`` looped, causal."""

    def __init__(self, tau: int = 3, norm_first: bool = False):
        super().__init__()
        self.tau = tau
        self.embed = nn.Embedding(VOCAB, D)
        self.core = nn.TransformerEncoderLayer(
            D, HEADS, FF, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.head = nn.Linear(D, VOCAB, bias=False)
        _perturb(self.core)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=self.embed.weight.dtype)
        x = self.embed(tokens)
        for _ in range(self.tau):
            x = self.core(x, src_mask=mask, is_causal=True)
        return self.head(x)


# (h) ------------------------------------------------------------------------------------------


class KeywordBlock(nn.Module):
    """Attention whose ``qkv`` Linear is called with a keyword argument, and an MLP whose ``up``
    Linear is optionally ``weight_norm``-parametrised (``up.parametrizations.weight``).
    ``inline_norm``: the output projection's rows are normalised in the forward, by plain tensor
    ops on the weight before ``F.linear`` (as nGPT-style models do)."""

    def __init__(self, d: int, heads: int, ff: int, reparametrised: bool, inline_norm: bool):
        super().__init__()
        self.heads, self.inline_norm = heads, inline_norm
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = weight_norm(nn.Linear(d, ff)) if reparametrised else nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(input=_rms(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        y = causal_attention(q, k, v)
        if self.inline_norm:
            w = self.proj.weight
            x = x + F.linear(y, 2 * w / w.norm(dim=1, keepdim=True))
        else:
            x = x + self.proj(y)
        return x + self.down(F.gelu(self.up(self.norm(x))))


class KeywordLM(_CoreLM):
    def __init__(self, reparametrised: bool = False, inline_norm: bool = False, tau: int = 3):
        super().__init__(lambda: KeywordBlock(D, HEADS, FF, reparametrised, inline_norm), tau)


# --------------------------------------------------------------------------------------------


def token_batches(n: int, batch_size: int, seed: int, seq: int = SEQ, vocab: int = VOCAB):
    """``n`` random sequences as a list of ``{"tokens": (b, seq)}`` batches."""
    tokens = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": tokens[i : i + batch_size]} for i in range(0, n, batch_size)]
