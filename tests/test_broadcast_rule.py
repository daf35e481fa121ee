"""The broadcast rule of :mod:`sdi.rules.ops` (``x * s`` / ``x + s`` with a parameter-derived ``s``):
per-pass step sums against per-step features, and exact features against one-example autograd,
for each way ``s`` can be broadcast -- summed over tokens and features, over tokens only, or
spanning every non-batch dimension (nothing summed: the product itself is the gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from direct_uses import captured_uses
from looped_lm import next_token_losses

from sdi import FullGradientTracInSDI
from sdi.backend import get_backend
from sdi.featurize import Featurizer
from sdi.rules.modes import ExactRules
from sdi.rules.ops import OpRules

V, D, T, H = 13, 6, 5, 2


class Scaled(nn.Module):
    """A block looped three times whose vector / matrix parameters multiply the stream:
    ``gain (H, 1)`` per head, ``scale (D,)``, ``mix[1] (D,)`` (a row of a ``(2, D)`` parameter),
    ``full (T, D)`` (every non-batch dimension: nothing to sum), ``shift (D,)`` added; or ``lin``:
    a row of the block's Linear weight scales the Linear's input (one parameter, two rules)."""

    def __init__(self, which: str):
        super().__init__()
        self.which = which
        self.embed = nn.Embedding(V, D)
        self.lin = nn.Linear(D, D)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(H, 1))
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(D))
        self.mix = nn.Parameter(1 + 0.3 * torch.randn(2, D))
        self.full = nn.Parameter(1 + 0.3 * torch.randn(T, D))
        self.shift = nn.Parameter(0.3 * torch.randn(D))
        self.head = nn.Linear(D, V)

    def block(self, x):
        if self.which == "lin":  # a row of the Linear's weight scales the Linear's input
            return x + torch.tanh(self.lin(x * self.lin.weight[1]))
        y = torch.tanh(self.lin(x))
        if self.which == "gain":
            y = (y.view(*y.shape[:2], H, D // H) * self.gain).flatten(2)
        elif self.which == "scale":
            y = self.scale * y
        elif self.which == "mix":
            y = y * self.mix[1]
        elif self.which == "full":
            y = y * self.full
        else:
            y = y + self.shift
        return x + y

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.block(x)
        return self.head(x)


def lm_loss(model, ids):
    return next_token_losses(model, ids).sum(1)


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(1))


WHICH = ["gain", "scale", "mix", "full", "shift"]


@pytest.mark.parametrize("which", [*WHICH, "lin"])
def test_step_sums_equal_the_sum_of_steps(which):
    torch.manual_seed(0)
    model = Scaled(which).eval()
    f = Featurizer(
        model=model,
        target_modules=[getattr(model, which)],
        projection_size=32,
        backend=get_backend("torch"),
    )
    ids = _ids(4)
    per_step, _ = f.compute_batch(ids, lm_loss)
    summed, _ = f.compute_batch(ids, lm_loss, sum_steps=True)
    f.close()
    torch.testing.assert_close(summed, per_step.sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", WHICH)
def test_exact_features_equal_autograd(which):
    torch.manual_seed(0)
    model = Scaled(which).eval()
    p = getattr(model, which)
    est = FullGradientTracInSDI(model=model, target_modules=[p])
    ids = _ids(3)
    feats = est.featurize_loader(loader=[ids], loss_fn=lm_loss)
    est.close()
    (got,) = feats.phi.values()
    got = got.reshape(ids.shape[0], got.shape[1], -1).sum(1)
    for i in range(ids.shape[0]):
        (want,) = torch.autograd.grad(lm_loss(model, ids[i : i + 1]).sum(), [p])
        torch.testing.assert_close(got[i], want.reshape(-1), rtol=1e-5, atol=1e-6)


class _Vector(nn.Module):
    """``s (D,)`` combined with the stream, written each way the rule must read."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.s = nn.Parameter(torch.randn(7))

    def forward(self, x):
        if self.form == "x * s":
            return x * self.s
        if self.form == "s * x":
            return self.s * x
        if self.form == "torch.mul(x, s)":
            return torch.mul(x, self.s)
        return x + self.s


@pytest.mark.parametrize("batch_dim", [0, 1])
@pytest.mark.parametrize("form", ["x * s", "s * x", "torch.mul(x, s)", "x + s"])
def test_every_operand_order_and_batch_dim_gives_the_per_example_gradient(form, batch_dim):
    """One rule instance sees the same shapes twice (its shape analysis is kept per shapes):
    both times the exact features equal each example's own autograd gradient."""
    torch.manual_seed(3)
    module = _Vector(form)
    rules = OpRules(lambda: ExactRules())
    for _ in range(2):
        x = torch.randn(3, 5, 7)  # 3 examples on batch_dim, 5 tokens on the other
        (use,) = captured_uses(module, x, batch_dim)
        g = torch.randn(3, 5, 7)
        got = rules.features(use, g.movedim(batch_dim, 0))[module.s]
        for b in range(x.shape[batch_dim]):
            one = x.select(batch_dim, b).unsqueeze(batch_dim)
            out = module(one)
            (want,) = torch.autograd.grad(
                out, [module.s], g.select(batch_dim, b).unsqueeze(batch_dim)
            )
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)
