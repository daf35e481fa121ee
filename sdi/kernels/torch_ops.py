"""Plain-torch sketch operations: the CPU product and the reference every other backend matches.

All functions accept fp32 / fp16 / bf16 inputs and return fp32. Shapes use ``B`` for examples,
``T`` for tokens (every non-batch, non-feature dimension flattened), ``m`` for the sketch size.

Two ways to TensorSketch a Linear weight gradient ``G_b^T A_b``: :func:`tensor_sketch_linear` never
forms it (count-sketch both factors, FFT-convolve per token: ``O(T m log m)`` per example), while
:func:`linear_weight_grads` + :func:`sketch_dense` form it with one batched matmul and hash its
``d_out * d_in`` entries (``O(T d_out d_in)`` matmul flops, which run far faster than FFTs): the
cheaper one for small layers, and the only one whose input can be summed over loop steps before
sketching. :class:`sdi.rules.SketchRules` chooses between them per call.
"""

from __future__ import annotations

import torch

from ..sketch import CountSketchHash, TensorSketchHash, tensor_sketch_index


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
    Entry ``j`` of ``g_t`` lands in bucket ``(h_out[id_t] + h_in[j]) mod m`` with sign
    ``s_out[id_t] * s_in[j]``: one scatter of the ``T * d`` entries (never ``T * m``).
    """
    m = table.m
    ids = ids.long()
    B = g.shape[0]
    index = (table.out.h[ids].unsqueeze(-1) + table.inp.h) % m  # (B, T, d)
    values = g.to(torch.float32) * (table.out.s[ids].unsqueeze(-1) * table.inp.s)
    out = torch.zeros(B, m, dtype=torch.float32, device=g.device)
    return out.scatter_add_(1, index.reshape(B, -1), values.reshape(B, -1))


def linear_weight_grads(
    a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None, *, add: bool = False
) -> torch.Tensor:
    """Per-example Linear weight gradients ``G_b^T A_b``, materialised by one batched matmul.

    a: ``(B, T, d_in)`` activations; g: ``(B, T, d_out)`` grad-outputs. Returns ``(B, d_out, d_in)``
    fp32: a new tensor, or ``out`` (a tensor this function returned before) overwritten -- or added
    to, with ``add=True`` -- in place. When ``d_out > d_in`` a new result is the transposed view of
    a contiguous ``(B, d_in, d_out)`` tensor: MKL computes the product about 10% faster with the
    longer side as the columns.
    """
    a, g = a.to(torch.float32), g.to(torch.float32)
    transposed = g.shape[-1] > a.shape[-1] if out is None else not out.is_contiguous()
    if transposed:  # (A^T G)^T, written into the contiguous base: a view takes a per-example loop
        a, g = g, a
        out = None if out is None else out.transpose(1, 2)
    if out is None:
        out = torch.bmm(g.transpose(1, 2), a)
    else:
        out.baddbmm_(g.transpose(1, 2), a, beta=1.0 if add else 0.0)
    return out.transpose(1, 2) if transposed else out


def signed_index(table: TensorSketchHash) -> torch.Tensor:
    """The 2-D hash of :func:`sdi.sketch.tensor_sketch_index` as one int64 ``(d_out, d_in)`` tensor.

    Entry ``(i, j)`` is the bucket ``(h_out[i] + h_in[j]) mod m``, plus ``m`` where the sign
    ``s_out[i] * s_in[j]`` is negative: :func:`sketch_dense` adds into ``2 m`` buckets and subtracts
    the upper half, so it never multiplies the matrix by its signs.
    """
    index, sign = tensor_sketch_index(table)
    return index + table.m * (sign < 0)


def sketch_dense(phi: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """TensorSketch of explicit matrices ``phi (B, d_out, d_in)`` -> ``(B, m)`` fp32.

    ``index``: :func:`signed_index` of the table, ``(d_out, d_in)``. Equals
    :func:`sdi.sketch.sketch_matrix_explicit`. ``phi`` may be contiguous or the transposed view of a
    contiguous tensor; an ``index`` laid out the same way (``index.t().contiguous().t()`` for the
    latter) avoids copying it on every call.
    """
    if not phi.is_contiguous() and phi.transpose(1, 2).is_contiguous():
        phi, index = phi.transpose(1, 2), index.t()
    B = phi.shape[0]
    flat = phi.reshape(B, -1).to(torch.float32)
    out = torch.zeros(B, 2 * m, dtype=torch.float32, device=phi.device)
    # scatter_add_ along each example's row: 2x index_add_'s speed single-threaded on the CPU
    out.scatter_add_(1, index.reshape(1, -1).expand(B, -1), flat)
    return out[:, :m] - out[:, m:]
