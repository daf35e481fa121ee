"""Identity 1 and 2 of DESIGN §2: every fast sketch path equals the sketch of the explicit matrix."""

from __future__ import annotations

import pytest
import torch

from sdi.kernels import torch_ops
from sdi.sketch import draw_count_sketch, draw_tensor_sketch, sketch_matrix_explicit


def _tables(d_out, d_in, m, seed):
    return draw_tensor_sketch(d_out, d_in, m, torch.Generator().manual_seed(seed))


def _count_sketch_dense(table) -> torch.Tensor:
    """CountSketch as an explicit (d, m) matrix: column h(i) of row i holds s(i)."""
    dense = torch.zeros(table.d, table.m)
    dense[torch.arange(table.d), table.h] = table.s
    return dense


@pytest.mark.parametrize(
    "d_out,d_in,m,B,T", [(13, 7, 32, 3, 5), (5, 37, 64, 2, 1), (33, 9, 17, 1, 4)]
)
def test_linear_fft_path_equals_explicit_gradient(d_out, d_in, m, B, T):
    seed = d_out * 1000 + d_in
    table = _tables(d_out, d_in, m, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    a, g = torch.randn(B, T, d_in, generator=gen), torch.randn(B, T, d_out, generator=gen)
    phi = torch.einsum("bto,bti->boi", g, a)  # per-example gradient G^T A, materialised
    got = torch_ops.tensor_sketch_linear(a, g, table)
    torch.testing.assert_close(got, sketch_matrix_explicit(phi, table), rtol=1e-4, atol=1e-4)
    assert got.dtype == torch.float32 and got.shape == (B, m)


def test_explicit_sketch_matches_its_definition_elementwise():
    table = _tables(4, 3, 5, seed=3)
    phi = torch.randn(1, 4, 3)
    want = torch.zeros(5)
    for i in range(4):
        for j in range(3):
            k = (table.out.h[i] + table.inp.h[j]) % 5
            want[k] += table.out.s[i] * table.inp.s[j] * phi[0, i, j]
    torch.testing.assert_close(sketch_matrix_explicit(phi, table)[0], want)


@pytest.mark.parametrize("V,d,m,B,T", [(23, 7, 32, 3, 5), (50, 11, 16, 2, 9)])
def test_embedding_shift_path_equals_fft_and_explicit(V, d, m, B, T):
    table = _tables(V, d, m, seed=V + d)
    gen = torch.Generator().manual_seed(V * d)
    ids = torch.randint(0, V, (B, T), generator=gen)
    g = torch.randn(B, T, d, generator=gen)
    onehot = torch.nn.functional.one_hot(ids, V).float()  # (B, T, V): the Embedding's "activation"
    phi = torch.einsum("btv,btd->bvd", onehot, g)
    got = torch_ops.tensor_sketch_embedding(ids, g, table)
    torch.testing.assert_close(got, sketch_matrix_explicit(phi, table), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        got, torch_ops.tensor_sketch_linear(g, onehot, table), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("shape,m", [((3, 13), 8), ((2, 5, 37), 64), ((1, 1), 3)])
def test_count_sketch_equals_dense_projection(shape, m):
    table = draw_count_sketch(shape[-1], m, torch.Generator().manual_seed(m))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    torch.testing.assert_close(torch_ops.count_sketch(x, table), x @ _count_sketch_dense(table))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_sketches(dtype):
    table = _tables(9, 6, 32, seed=5)
    a, g = torch.randn(2, 4, 6), torch.randn(2, 4, 9)
    got = torch_ops.tensor_sketch_linear(a.to(dtype), g.to(dtype), table)
    assert got.dtype == torch.float32
    want = torch_ops.tensor_sketch_linear(a.to(dtype).float(), g.to(dtype).float(), table)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_same_seed_same_tables_other_seed_other_tables():
    one, two = _tables(10, 20, 64, seed=7), _tables(10, 20, 64, seed=7)
    assert torch.equal(one.out.h, two.out.h) and torch.equal(one.inp.s, two.inp.s)
    assert not torch.equal(one.out.h, _tables(10, 20, 64, seed=8).out.h)
    assert set(one.out.s.unique().tolist()) == {-1.0, 1.0}
    assert int(one.inp.h.min()) >= 0 and int(one.inp.h.max()) < 64


def test_sketch_is_unbiased_inner_product_estimate():
    """E<TS(x), TS(y)> = <x, y> over the hash draw (mean over many seeds)."""
    x, y = torch.randn(1, 6, 5), torch.randn(1, 6, 5)
    est = torch.stack(
        [
            (sketch_matrix_explicit(x, t) * sketch_matrix_explicit(y, t)).sum()
            for t in (_tables(6, 5, 8, s) for s in range(4000))
        ]
    )
    exact = (x * y).sum()
    assert abs(est.mean() - exact) < 4 * est.std() / 4000**0.5
