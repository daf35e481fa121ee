"""Gradients w.r.t. parameter-derived tensors mapped back onto the parameter
(:meth:`sdi.derived.Derived.backprop`), against per-example autograd on odd sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sdi.capture import CaptureMode, Scope
from sdi.derived import SLOT, Derived, Step

B = 3


def _chain(p: nn.Parameter, *steps) -> Derived:
    """``steps``: ``(func, args after the input, index)`` applied in turn to ``p``."""
    d = Derived((p,))
    for func, args, index in steps:
        d = d.then(Step(func, (SLOT, *args), {}, index))
    return d


def _autograd(d: Derived, p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """Per example ``b``: d <value, grad[b]> / d p by autograd, in float64."""
    leaf = p.detach().double().requires_grad_(True)
    out = d.value({p: leaf})
    return torch.stack(
        [
            torch.autograd.grad(out, leaf, grad[b].to(out.dtype), retain_graph=True)[0]
            for b in range(B)
        ]
    )


T = torch.Tensor
CHAINS = {
    "row": [(T.__getitem__, (1,), None)],
    "block with a column": [(T.__getitem__, ((slice(1, 3), slice(None), 2),), None)],
    "select": [(T.select, (1, 2), None)],
    "transpose then strided slice": [
        (T.transpose, (0, 2), None),
        (T.__getitem__, ((slice(1, None), slice(None, None, 2)),), None),
    ],
    "row, t, cast": [(T.__getitem__, (0,), None), (T.t, (), None), (T.to, (torch.float16,), None)],
    "expand (elements repeated)": [
        (T.__getitem__, ((slice(None), None),), None),
        (T.expand, (3, 4, 5, 7), None),
    ],
    "unbind": [(T.unbind, (0,), 2)],
    "flip and reshape": [(T.flip, (0,), None), (T.reshape, (15, 7), None)],
    "index_select with repeats": [(T.index_select, (0, torch.tensor([0, 2, 0])), None)],
    "not a pick (arithmetic)": [(T.__getitem__, (1,), None), (T.mul, (2.5,), None)],
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_backprop_equals_autograd(name):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 5, 7))
    d = _chain(p, *CHAINS[name])
    shape = d.value({p: p.detach()}).shape
    grad = torch.randn(B, *shape)
    if name.startswith("not a pick"):
        assert d.element_sources() is None
    else:
        assert d.element_sources() is not None
    got = d.backprop(grad, [p])[p]
    assert got.dtype == torch.float32 and got.shape == (B, *p.shape)
    atol = 2e-3 if "cast" in name else 1e-6  # a float16 grad is rounded by the cast's vjp
    torch.testing.assert_close(got.double(), _autograd(d, p, grad), atol=atol, rtol=0)


def test_backprop_of_an_unwanted_parameter_is_empty():
    p = nn.Parameter(torch.randn(4, 5))
    d = _chain(p, (T.__getitem__, (2,), None))
    assert d.backprop(torch.randn(B, 5), []) == {}


def test_a_derivation_by_constant_arguments_is_one_object_across_batches():
    """The captures of a featuriser's batches share the derivations whose steps take constant
    arguments (so their shortcuts are worked out once); a tensor argument is never taken for a
    constant, nor ``x[True]`` for ``x[1]``, nor ``-0.0`` for ``0.0``."""
    p = nn.Parameter(torch.randn(3, 4))

    class Params(Scope):
        def param_of(self, t):
            return p if t is p else None

    kept: dict = {}

    def derive(compute) -> Derived:
        with CaptureMode(Params(), kept) as mode:
            return mode._lookup(compute(p))

    first = derive(lambda w: w[1].t().to(torch.float64))
    assert derive(lambda w: w[1].t().to(torch.float64)) is first
    torch.testing.assert_close(first.value({p: p.detach()}), p.detach()[1].double())
    assert derive(lambda w: w[True]) is not derive(lambda w: w[1])
    assert derive(lambda w: w * 0.0) is not derive(lambda w: w * -0.0)
    rows = torch.tensor([0, 2])
    picked = derive(lambda w: w.index_select(0, rows))
    assert picked.key is None and derive(lambda w: w.index_select(0, rows)) is not picked
