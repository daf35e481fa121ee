"""The plain-torch kernels (sdi.kernels.torch_ops), identities 1 and 2 of DESIGN §2: every fast
sketch path (FFT, shift, materialised gradient) equals the sketch of the explicit matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import explicit_linear_sketch, linear_inputs

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


SHAPES = [(13, 7, 32, 3, 5), (5, 37, 64, 2, 1), (33, 9, 17, 1, 4), (129, 65, 1000, 4, 11)]


@pytest.mark.parametrize("d_out,d_in,m,B,T", SHAPES)
def test_materialised_path_equals_definition_and_fft_path(d_out, d_in, m, B, T):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh tables and inputs every run
    table = draw_tensor_sketch(d_out, d_in, m, torch.Generator().manual_seed(seed))
    a, g = linear_inputs(d_out, d_in, B, T, seed + 1)
    phi = torch_ops.linear_weight_grads(a, g)
    assert phi.shape == (B, d_out, d_in)
    torch.testing.assert_close(phi, torch.einsum("bto,bti->boi", g, a), rtol=1e-5, atol=1e-5)
    got = torch_ops.sketch_dense(phi, torch_ops.signed_index(table), m)
    assert got.dtype == torch.float32 and got.shape == (B, m)
    torch.testing.assert_close(got, explicit_linear_sketch(a, g, table), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        got, torch_ops.tensor_sketch_linear(a, g, table), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("d_out,d_in", [(31, 9), (9, 31)])  # both memory layouts of the result
def test_weight_grads_overwrite_and_add_in_place(d_out, d_in):
    a, g = linear_inputs(d_out, d_in, 3, 5, seed=d_out)
    a2, g2 = linear_inputs(d_out, d_in, 3, 5, seed=d_out + 1)
    out = torch_ops.linear_weight_grads(a, g)
    same = torch_ops.linear_weight_grads(a2, g2, out)
    assert same.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch_ops.linear_weight_grads(a2, g2))
    torch_ops.linear_weight_grads(a, g, out, add=True)
    want = torch.einsum("bto,bti->boi", g, a) + torch.einsum("bto,bti->boi", g2, a2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Any layout of phi and index gives the same sketch (only the speed differs).
    table = draw_tensor_sketch(d_out, d_in, 23, torch.Generator().manual_seed(d_in))
    index = torch_ops.signed_index(table)
    for phi in (out, out.contiguous(), out.transpose(1, 2).contiguous().transpose(1, 2)):
        for idx in (index, index.t().contiguous().t()):
            torch.testing.assert_close(
                torch_ops.sketch_dense(phi, idx, 23), sketch_matrix_explicit(out, table)
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_materialised_path_takes_half_inputs(dtype):
    table = draw_tensor_sketch(11, 6, 40, torch.Generator().manual_seed(3))
    a, g = linear_inputs(11, 6, 2, 4, seed=4, dtype=dtype)
    got = torch_ops.sketch_dense(
        torch_ops.linear_weight_grads(a, g), torch_ops.signed_index(table), 40
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, explicit_linear_sketch(a, g, table), rtol=1e-4, atol=1e-4)
