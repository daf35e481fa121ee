"""``nn.Linear``: weight ``phi = G^T A`` by TensorSketch, bias ``sum_tokens g`` by CountSketch.

The weight has two exact sketch paths (:mod:`sdi.kernels.torch_ops`): the backend's FFT path, and
on CPU the materialised gradient ``G^T A`` hashed with the table's 2-D index. The cost model below
picks the cheaper one per call; both give the same sketch up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..sketch import draw_count_sketch, draw_tensor_sketch
from .registry import ModuleRule, Use

# Cost model of the two weight paths on a CPU, in ns per example and use, fit to one thread of a
# Xeon (AVX-512, torch 2.13) over m = 256..4096, T = 1..256, d = 64..1024; it picks the faster path
# in all but near-ties. bench/speed/test_sketch_ops.py times both paths to check it elsewhere.
#   FFT:      T * (_FFT_NS * m * log2(m) + _HASH_NS * (d_in + d_out))
#   explicit: d_out * d_in * (_HASH_NS + _MATMUL_NS * 2 * T)
_FFT_NS, _HASH_NS, _MATMUL_NS = 0.5, 1.8, 0.009
# The explicit path keeps one (B, d_out, d_in) fp32 buffer per weight. Past this size it is not taken,
# however fast, so that a large layer over long sequences cannot claim gigabytes of memory.
EXPLICIT_MAX_BUFFER_BYTES = 128 << 20


def tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, ..., d)`` -> ``(B, T, d)``, every middle dimension counted as tokens."""
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def explicit_is_cheaper(d_out: int, d_in: int, n_tokens: int, batch: int, m: int) -> bool:
    """The CPU cost model: is the materialised gradient cheaper than the FFT path (and small enough)?"""
    if batch * d_out * d_in * 4 > EXPLICIT_MAX_BUFFER_BYTES:
        return False
    fft = n_tokens * (_FFT_NS * m * math.log2(max(m, 2)) + _HASH_NS * (d_in + d_out))
    return d_out * d_in * (_HASH_NS + _MATMUL_NS * 2 * n_tokens) < fft


class LinearRule(ModuleRule):
    def check(self, module: nn.Module, param: nn.Parameter, *, exact: bool) -> str | None:
        if param is module.weight or param is module.bias:
            return None
        return "nn.Linear has no parameter besides weight and bias for this rule"

    def draw_table(self, module, param, m, generator):
        if param is module.weight:
            return draw_tensor_sketch(param.shape[0], param.shape[1], m, generator)
        return draw_count_sketch(param.numel(), m, generator)

    def grads(self, module, params, use: Use) -> list[torch.Tensor]:
        g = tokens(use.grad).float()
        out = []
        for p in params:
            if p is module.weight:
                a = tokens(use.activations[0]).float()
                out.append(torch.einsum("bto,bti->boi", g, a).reshape(use.batch, -1))
            else:
                out.append(g.sum(dim=1))
        return out

    def sketch(self, rules, module, params, use: Use) -> list[torch.Tensor]:
        g = tokens(use.grad)
        out = []
        for p in params:
            if p is module.bias:
                out.append(rules.backend.count_sketch(g.sum(dim=1), rules.tables[p]))
                continue
            a = tokens(use.activations[0])
            if rules.prefers_explicit(p, a.shape[1], a.device, a.shape[0]):
                out.append(rules.sketch_dense(p, rules.weight_grads(p, a, g)))
            else:
                out.append(rules.backend.tensor_sketch_linear(a, g, rules.tables[p]))
        return out

    def add_step(self, sums, module, params, use: Use) -> None:
        """Explicit-path weights and biases add unhashed (hashed once per pass); FFT weights add sketches."""
        rules = sums.rules
        g = tokens(use.grad)
        for p in params:
            if p is module.bias:
                sums.add_grad(p, g.sum(dim=1))
                continue
            a = tokens(use.activations[0])
            if rules.prefers_explicit(p, a.shape[1], a.device, a.shape[0]):
                sums.add_linear(p, a, g)
            else:
                sums.add_sketch(p, rules.backend.tensor_sketch_linear(a, g, rules.tables[p]))
