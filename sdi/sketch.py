"""Hash tables for CountSketch and TensorSketch, and the sketch definitions they serve.

A CountSketch of a vector ``v`` of length ``d`` into ``m`` buckets is::

    CS(v)[k] = sum_{i : h(i) = k} s(i) * v[i]          h: [d] -> [m],  s: [d] -> {-1, +1}

A TensorSketch of a matrix ``phi`` of shape ``(d_out, d_in)`` uses one table per side::

    TS(phi)[k] = sum_{(h_out(i) + h_in(j)) mod m = k} s_out(i) * s_in(j) * phi[i, j]

For ``phi = G^T A`` (a Linear weight gradient) this equals
``irfft(sum_tokens rfft(CS_out(g)) * rfft(CS_in(a)))``; the kernels compute it that way.

Tables are drawn on the CPU from one seeded ``torch.Generator`` and only then moved, so one seed
gives one sketch on every device and backend. The draw order (per parameter: ``h``, then ``s``;
for a matrix: the output side, then the input side) matches ``step-decomposed-influence`` 0.1.1 on
the CPU, so both packages hash identically for the same seed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CountSketchHash:
    """Bucket ``h`` (int64, shape ``(d,)``, values in ``[0, m)``) and sign ``s`` (float32 ±1)."""

    h: torch.Tensor
    s: torch.Tensor
    m: int

    @property
    def d(self) -> int:
        return int(self.h.numel())

    def to(self, device: torch.device | str) -> CountSketchHash:
        return CountSketchHash(self.h.to(device), self.s.to(device), self.m)


@dataclass(frozen=True)
class TensorSketchHash:
    """The two CountSketch tables of a ``(d_out, d_in)`` matrix: ``out`` rows, ``inp`` columns."""

    out: CountSketchHash
    inp: CountSketchHash

    @property
    def m(self) -> int:
        return self.out.m

    def to(self, device: torch.device | str) -> TensorSketchHash:
        return TensorSketchHash(self.out.to(device), self.inp.to(device))


def _check_sizes(d: int, m: int) -> None:
    if d <= 0:
        raise ValueError(f"a sketched dimension must be positive, got d={d}")
    if m <= 0:
        raise ValueError(f"projection_size must be positive, got m={m}")


def draw_count_sketch(d: int, m: int, generator: torch.Generator) -> CountSketchHash:
    """Draw a CountSketch table for length-``d`` vectors from a CPU ``generator``."""
    _check_sizes(d, m)
    h = torch.randint(0, m, (d,), generator=generator, dtype=torch.int64)
    s = torch.randint(0, 2, (d,), generator=generator, dtype=torch.int64) * 2 - 1
    return CountSketchHash(h=h, s=s.to(torch.float32), m=int(m))


def draw_tensor_sketch(
    d_out: int, d_in: int, m: int, generator: torch.Generator
) -> TensorSketchHash:
    """Draw the two tables of a TensorSketch for ``(d_out, d_in)`` matrices (output side first)."""
    out = draw_count_sketch(d_out, m, generator)
    inp = draw_count_sketch(d_in, m, generator)
    return TensorSketchHash(out=out, inp=inp)


def tensor_sketch_index(table: TensorSketchHash) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D hash of a TensorSketch, materialised: bucket and sign of every ``(i, j)``.

    Returns ``(index, sign)``, both of shape ``(d_out, d_in)``: ``index = (h_out[i] + h_in[j]) mod m``
    (int64) and ``sign = s_out[i] * s_in[j]`` (float32). ``TS(phi)`` is then a scatter-add of
    ``sign * phi`` into ``index``; used by the explicit reference and the small-matrix fast path.
    """
    index = (table.out.h[:, None] + table.inp.h[None, :]) % table.m
    sign = table.out.s[:, None] * table.inp.s[None, :]
    return index, sign


def sketch_matrix_explicit(phi: torch.Tensor, table: TensorSketchHash) -> torch.Tensor:
    """TensorSketch of explicit matrices ``phi`` of shape ``(B, d_out, d_in)`` -> ``(B, m)`` fp32.

    The definition itself, with no FFT: the plain reference that every fast path is tested against.
    """
    index, sign = tensor_sketch_index(table)
    flat = (phi.to(torch.float32) * sign).reshape(phi.shape[0], -1)
    out = torch.zeros(phi.shape[0], table.m, dtype=torch.float32, device=phi.device)
    return out.index_add_(1, index.reshape(-1), flat)
