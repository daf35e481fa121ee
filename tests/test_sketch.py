"""Hash tables and the explicit sketch (sdi.sketch): definition, seeding, unbiasedness."""

from __future__ import annotations

import torch

from sdi.sketch import draw_tensor_sketch, sketch_matrix_explicit


def _tables(d_out, d_in, m, seed):
    return draw_tensor_sketch(d_out, d_in, m, torch.Generator().manual_seed(seed))


def test_explicit_sketch_matches_its_definition_elementwise():
    table = _tables(4, 3, 5, seed=3)
    phi = torch.randn(1, 4, 3)
    want = torch.zeros(5)
    for i in range(4):
        for j in range(3):
            k = (table.out.h[i] + table.inp.h[j]) % 5
            want[k] += table.out.s[i] * table.inp.s[j] * phi[0, i, j]
    torch.testing.assert_close(sketch_matrix_explicit(phi, table)[0], want)


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
