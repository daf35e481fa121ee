"""The two sketch paths of a Linear weight's use (``F.linear``, ``x @ w``: :mod:`sdi.rules.ops`).

A weight's per-example gradient ``phi = G^T A`` has two exact sketch paths
(:mod:`sdi.kernels.torch_ops`): the backend's FFT path (TensorSketch), and on CPU the materialised
gradient ``G^T A`` hashed with the table's 2-D index. The cost model below picks the cheaper one
per use; both give the same sketch up to float rounding.
"""

from __future__ import annotations

import math

import torch

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
    if x.dim() == 3:
        return x
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def explicit_is_cheaper(d_out: int, d_in: int, n_tokens: int, batch: int, m: int) -> bool:
    """The CPU cost model: is the materialised gradient cheaper than the FFT path (and small enough)?"""
    if batch * d_out * d_in * 4 > EXPLICIT_MAX_BUFFER_BYTES:
        return False
    fft = n_tokens * (_FFT_NS * m * math.log2(max(m, 2)) + _HASH_NS * (d_in + d_out))
    return d_out * d_in * (_HASH_NS + _MATMUL_NS * 2 * n_tokens) < fft
