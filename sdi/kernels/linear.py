"""Triton TensorSketch of per-example Linear weight gradients: checks and the choice of path.

For one use of an ``nn.Linear`` with activations ``a (B, T, d_in)`` and grad-outputs
``g (B, T, d_out)``, the per-example gradient is ``phi_b = G_b^T A_b (d_out, d_in)``, sketched as::

    TS(phi_b) = irfft( sum_t rfft(CS_out(g[b, t])) * rfft(CS_in(a[b, t])) )        (B, m) fp32

computed without ever forming ``phi_b``, by one of two algorithms: ``"simple"``
(:mod:`sdi.kernels.linear_simple`: Triton CountSketch, cuFFT, a spectrum-product kernel; any m) or
``"fused"`` (:mod:`sdi.kernels.linear_fused`: one kernel, on-chip CountSketch and four-step DFT;
m a power of two in [16, 4096]).
"""

from __future__ import annotations

import torch

from ..sketch import TensorSketchHash
from . import roofline
from .linear_fused import (
    FUSED_MAX_M,
    FUSED_MIN_M,
    device_capability,
    fused_unsupported,
    linear_fused,
)
from .linear_simple import linear_simple
from .utils import check_out, check_table, check_tensor_tables

PATHS = ("simple", "fused")

# The shape at which the two paths are compared until a GPU measures (DESIGN.md section 5).
PAPER_SHAPE = (8, 2048, 4096, 4096)


def default_path(m: int, device: torch.device | None = None) -> str:
    """The Linear path used when the caller names none, for sketch size ``m`` on ``device``.

    Rule (until a GPU run of ``bench/gpu/gpu.sh`` measures both): ``"fused"`` where it supports
    ``m`` and the compile-time roofline (:mod:`sdi.kernels.roofline`, tabled in
    bench/results/kernels.md) predicts it faster than ``"simple"`` at the paper-like shape
    ``B=8, T=2048, d_in=d_out=4096``; ``"simple"`` otherwise. The fused kernel reads its inputs
    once, the simple path moves its sketches and spectra through HBM four times more. Where the
    fused kernel cannot run on ``device`` (:func:`sdi.kernels.linear_fused.fused_unsupported`),
    ``"simple"``.
    """
    capability = None if device is None else device_capability(device)
    if fused_unsupported(m, capability) is not None:
        return "simple"
    fused = roofline.linear_estimate("fused", *PAPER_SHAPE, m)
    simple = roofline.linear_estimate("simple", *PAPER_SHAPE, m)
    return "fused" if fused is not None and fused.ms < simple.ms else "simple"


__all__ = ["FUSED_MAX_M", "FUSED_MIN_M", "PATHS", "default_path", "tensor_sketch_linear"]


def tensor_sketch_linear(
    a: torch.Tensor,
    g: torch.Tensor,
    table: TensorSketchHash,
    *,
    path: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """TensorSketch of per-example Linear weight gradients ``G_b^T A_b``, never materialised.

    a: ``(B, T, d_in)`` activations; g: ``(B, T, d_out)`` grad-outputs (fp32/fp16/bf16, same
    device as ``table``). Returns ``(B, m)`` fp32,
    ``irfft(sum_T rfft(CS_out(g)) * rfft(CS_in(a)))``, as
    :func:`sdi.kernels.torch_ops.tensor_sketch_linear`. ``path``: ``"simple"`` (any m),
    ``"fused"`` (m a power of two in [16, 4096]), or None for :func:`default_path`; see the
    module docstring. ``out``, if given, is a
    contiguous fp32 ``(B, m)`` tensor that receives the result.
    """
    if path is None:
        path = default_path(table.m, a.device)
    if path not in PATHS:
        raise ValueError(f"tensor_sketch_linear: path must be one of {PATHS}, got {path!r}")
    check_tensor_tables(table)
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(
            f"tensor_sketch_linear: need a (B, T, d_in) and g (B, T, d_out) with equal B, T; "
            f"got a {tuple(a.shape)}, g {tuple(g.shape)}"
        )
    if a.device != g.device:
        raise ValueError(f"tensor_sketch_linear: a is on {a.device} but g is on {g.device}")
    check_table("tensor_sketch_linear (a vs table.inp)", a, table.inp)
    check_table("tensor_sketch_linear (g vs table.out)", g, table.out)
    n_b, n_t, _ = a.shape
    out = check_out("tensor_sketch_linear", out, (n_b, table.m), a.device)
    if n_b == 0 or n_t == 0:
        return out.zero_()
    a, g = a.contiguous(), g.contiguous()
    if path == "simple":
        return linear_simple(a, g, table, out)
    return linear_fused(a, g, table, out)
