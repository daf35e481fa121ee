"""Plain-torch sketch operations: the CPU product and the reference every other backend matches.

All functions accept fp32 / fp16 / bf16 inputs and return fp32. Shapes use ``B`` for examples,
``T`` for tokens (every non-batch, non-feature dimension flattened), ``m`` for the sketch size.
"""

from __future__ import annotations

import torch

from ..sketch import CountSketchHash, TensorSketchHash


def count_sketch(x: torch.Tensor, table: CountSketchHash) -> torch.Tensor:
    """CountSketch of the last dimension: ``x (..., d)`` -> ``(..., m)`` fp32."""
    if x.shape[-1] != table.d:
        raise ValueError(f"count_sketch: last dimension {x.shape[-1]} != table size {table.d}")
    rows = x.reshape(-1, table.d).to(torch.float32) * table.s
    out = torch.zeros(rows.shape[0], table.m, dtype=torch.float32, device=x.device)
    out.index_add_(1, table.h, rows)
    return out.reshape(*x.shape[:-1], table.m)


def tensor_sketch_linear(a: torch.Tensor, g: torch.Tensor, table: TensorSketchHash) -> torch.Tensor:
    """TensorSketch of per-example Linear weight gradients ``G_b^T A_b``, never materialised.

    a: ``(B, T, d_in)`` activations; g: ``(B, T, d_out)`` grad-outputs. Returns ``(B, m)`` fp32:
    ``irfft(sum_T rfft(CS_out(g)) * rfft(CS_in(a)))``.
    """
    m = table.m
    spec_g = torch.fft.rfft(count_sketch(g, table.out), n=m, dim=-1)
    spec_a = torch.fft.rfft(count_sketch(a, table.inp), n=m, dim=-1)
    return torch.fft.irfft((spec_g * spec_a).sum(dim=1), n=m, dim=-1)


def tensor_sketch_embedding(
    ids: torch.Tensor, g: torch.Tensor, table: TensorSketchHash
) -> torch.Tensor:
    """TensorSketch of per-example Embedding weight gradients ``sum_t onehot(id_t) ⊗ g_t``.

    ids: ``(B, T)`` integer token ids; g: ``(B, T, d)`` grad-outputs. Returns ``(B, m)`` fp32.
    The one-hot side sketches to a single signed spike at ``h_out[id]``, so each token's term is
    ``CS_in(g_t)`` circularly shifted by ``h_out[id_t]`` and multiplied by ``s_out[id_t]``: no FFT.
    """
    m = table.m
    cs = count_sketch(g, table.inp)  # (B, T, m)
    ids = ids.long()
    shift = table.out.h[ids]  # (B, T)
    sign = table.out.s[ids]  # (B, T)
    # out[k] = sum_t sign_t * cs_t[(k - shift_t) mod m]
    k = torch.arange(m, device=g.device)
    src = (k.view(1, 1, m) - shift.unsqueeze(-1)) % m
    return (cs.gather(-1, src) * sign.unsqueeze(-1)).sum(dim=1)
