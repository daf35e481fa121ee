"""Per-head and grouped products with a parameter (issue 18: ``bmm`` / ``einsum`` as ``G^T A``).

``einsum("bhti,hio->bhto", x, w)``, ``x @ w`` with a 3-D ``w`` and other contractions linear in a
parameter get their per-example gradient from one ``einsum(x, g -> b w)``. Checked against plain
autograd one example at a time, on odd sizes, in a looped model; projected features are the sketch
of the exact ones, and forms the rule does not cover (the batch inside ``w``) still take the vjp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from looped_lm import next_token_losses, per_example_grads

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.featurize import Featurizer
from sdi.rules import ops

V, D, H, E = 13, 9, 3, 5


class PerHead(nn.Module):
    """Attention-like block whose projections are per-head weights used by einsum / matmul."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.up = nn.Parameter(torch.randn(H, D, E) / D**0.5)  # (heads, in, out)
        self.down = nn.Parameter(torch.randn(H, D, E) / E**0.5)  # used as (heads, out, in)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(H, E))

    def forward(self, x):  # (B, T, D)
        h = x.unsqueeze(1).expand(-1, H, -1, -1)  # (B, H, T, D)
        if self.form == "einsum":
            y = torch.einsum("bhti,hio->bhto", h, self.up)
            y = torch.einsum("bhto,ho->bhto", F.gelu(y), self.gain)
            z = torch.einsum("bhto,hio->bhti", y, self.down)
        elif self.form == "matmul":
            y = F.gelu(h @ self.up) * self.gain[:, None, :]
            z = y @ self.down.transpose(1, 2)
        else:  # "bmm": heads folded into the batch of torch.bmm
            B, T = x.shape[:2]
            y = torch.bmm(h.transpose(0, 1).reshape(H, B * T, D), self.up)
            y = F.gelu(y) * self.gain[:, None, :]
            z = torch.bmm(y, self.down.transpose(1, 2)).reshape(H, B, T, D)
            z = z.transpose(0, 1)
        return x + z.mean(1)


class Looped(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.core = PerHead(form)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.core(x)
        return self.head(x)


def _loss(model, ids):
    return next_token_losses(model, ids).mean(1)


def _per_example(model, ids) -> torch.Tensor:
    return per_example_grads(model, list(model.core.parameters()), _loss, [ids])


@pytest.mark.parametrize("form", ["einsum", "matmul"])
def test_per_head_products_equal_per_example_autograd_without_the_vjp(form, monkeypatch):
    torch.manual_seed(7)
    model = Looped(form).double().eval()
    ids = torch.randint(0, V, (4, 6))
    calls = []
    vjp = ops.op_vjp
    monkeypatch.setattr(ops, "op_vjp", lambda use, g: (calls.append(use.name), vjp(use, g))[1])
    f = Featurizer(model=model, target_modules=model.core, projection_size=None)
    try:
        got, steps = f.compute_batch(ids, _loss, sum_steps=True)
    finally:
        f.close()
    assert steps == 3
    # features are fp32 (as every rule's)
    torch.testing.assert_close(got.double(), _per_example(model, ids), rtol=1e-5, atol=1e-7)
    assert not [c for c in calls if c in ("einsum", "matmul", "__matmul__")], calls


def test_bmm_with_the_heads_as_its_batch_falls_back_to_a_named_path():
    """``bmm`` over heads with the examples merged into its rows hides the batch: the core is
    then recomputed example by example (the generic rule), still exact."""
    torch.manual_seed(8)
    model = Looped("bmm").double().eval()
    ids = torch.randint(0, V, (3, 5))
    f = Featurizer(model=model, target_modules=model.core, projection_size=None)
    try:
        got, _ = f.compute_batch(ids, _loss, sum_steps=True)
    finally:
        f.close()
    torch.testing.assert_close(got.double(), _per_example(model, ids), rtol=1e-5, atol=1e-7)


def test_projected_per_head_features_are_the_sketch_of_the_exact_ones(tmp_path):
    from sdi import CheckpointSpec

    torch.manual_seed(9)
    model = Looped("einsum").eval()
    path = str(tmp_path / "c.pt")
    torch.save({"model_state_dict": model.state_dict()}, path)
    gen = torch.Generator().manual_seed(1)
    train = [torch.randint(0, V, (4, 6), generator=gen) for _ in range(2)]
    query = [torch.randint(0, V, (3, 6), generator=gen)]
    kw = dict(checkpoints=[CheckpointSpec(path)], train_loader=train, query_loader=query)
    exact = FullGradientTracInSDI(model=model, target_modules=model.core)
    want = exact.influence_across_checkpoints(loss_fn=_loss, mode="sdi", **kw)
    errors = []
    for m in (64, 4096):
        est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=m)
        got = est.influence_across_checkpoints(loss_fn=_loss, mode="sdi", **kw)
        torch.testing.assert_close(got.sdi.sum(-1), got.tracin, rtol=1e-4, atol=1e-6)
        errors.append(float((got.sdi - want.sdi).norm() / want.sdi.norm()))
    assert errors[1] < errors[0] and errors[1] < 0.15, errors
