"""One path for every use: capture -> use -> rule -> feature (issue 18, "one mechanism").

Linear and Embedding calls are captured at their operations like any other; the calls of modules
served by a module-level rule (Opacus-covered, registered, generic) reach the rules as the same
:class:`sdi.capture.OpUse` objects, with their per-example arguments known from the data flow.
Each test checks exact features against plain autograd run one example at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdi import FullGradientTracInSDI
from sdi.capture import _TAG, Batched, CaptureMode, OpUse, Scope
from sdi.featurize import Featurizer
from sdi.rules import GENERIC, OPACUS, RULES

V, D = 11, 6


def _per_example_grads(model, params, ids, loss_of) -> torch.Tensor:
    """``(B, sum numel)``: d loss_i / d params, one example at a time (a batch of one)."""
    rows = []
    for i in range(ids.shape[0]):
        grads = torch.autograd.grad(loss_of(model, ids[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _exact(model, targets, ids, loss_of, **kw) -> torch.Tensor:
    f = Featurizer(model=model, target_modules=targets, projection_size=None, **kw)
    try:
        feats, _ = f.compute_batch(ids, loss_of, sum_steps=True)
    finally:
        f.close()
    return feats


def _lm_loss(model, ids):
    return model(ids).pow(2).mean(dim=(1, 2))


class Mixed(nn.Module):
    """nn.Embedding, nn.Linear, nn.LayerNorm (Opacus) and a module of a registered rule."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.up = nn.Linear(D, 2 * D - 1)
        self.norm = nn.LayerNorm(2 * D - 1)
        self.gain = Gain(2 * D - 1)
        self.down = nn.Linear(2 * D - 1, D, bias=False)

    def forward(self, ids):
        return self.down(self.gain(self.norm(self.up(self.embed(ids)))))


class Gain(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


def test_every_use_reaches_the_rules_as_one_kind_of_object(monkeypatch):
    torch.manual_seed(0)
    model = Mixed().double()
    ids = torch.randint(0, V, (5, 7))
    seen: list[OpUse] = []
    record = Featurizer._on_op_grad
    monkeypatch.setattr(
        Featurizer, "_on_op_grad", lambda self, use, g: (seen.append(use), record(self, use, g))
    )
    monkeypatch.setitem(RULES, Gain, GENERIC)  # a registered module-level rule
    got = _exact(model, [model], ids, _lm_loss)
    params = list(model.parameters())
    want = _per_example_grads(model, params, ids, _lm_loss)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)

    assert all(isinstance(use, OpUse) for use in seen)
    by = {use.name: use for use in seen}
    # Linear and Embedding: their operations; LayerNorm and Gain: their module-level rules.
    assert sorted(by) == ["Gain", "LayerNorm", "embedding", "linear"]
    assert [u.module for u in seen if u.module is not None] == [model.gain, model.norm]
    assert by["LayerNorm"].params == (model.norm.weight, model.norm.bias)
    x = by["Gain"].args[0]
    assert isinstance(x, Batched) and x.dim == 0 and x.tensor.shape == (5, 7, 2 * D - 1)


class TableMixer(nn.Module):
    """A module given a shared table whose first dimension equals the batch size."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x, table):
        return x * self.w + (x @ table.t()) @ table


class WithTable(nn.Module):
    def __init__(self, rows: int):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.register_buffer("table", torch.randn(rows, D))
        self.mix = TableMixer(D)

    def forward(self, ids):
        return self.mix(self.embed(ids), self.table)


def test_the_generic_rule_splits_only_what_the_data_flow_says_is_per_example(monkeypatch):
    """A shared table of 4 rows beside a batch of 4: the generic rule gives it to every example
    whole (it is not computed from the batch), where a guess by size would split it."""
    torch.manual_seed(1)
    monkeypatch.setitem(RULES, TableMixer, GENERIC)
    model = WithTable(rows=4).double()
    ids = torch.randint(0, V, (4, 3))
    got = _exact(model, [model.mix], ids, _lm_loss)
    want = _per_example_grads(model, [model.mix.w], ids, _lm_loss)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


def test_the_batch_survives_unbind_when_another_dimension_has_its_size():
    """``q, k, v = qkv.permute(2, 0, 3, 1, 4)`` with as many heads as examples: the batch is
    followed through the permute and the unbind, not found by its size."""

    class Tags(Scope):
        pass

    B, T, H, dh = 2, 5, 2, 3
    x = torch.randn(B, T, 3 * H * dh)
    with CaptureMode(Tags()) as mode:
        mode.seed(x, 0)
        qkv = x.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # (3, B, H, T, dh)
        q, k, v = qkv
        q0 = qkv.select(0, 1)
        heads_summed = q.sum(dim=1)  # (B, T, dh)
        batch_removed = q.sum(dim=0)  # (H, T, dh): the batch reduced away
    assert getattr(qkv, _TAG)[1] == 1
    assert [getattr(t, _TAG)[1] for t in (q, k, v, q0, heads_summed)] == [0, 0, 0, 0, 0]
    assert getattr(batch_removed, _TAG)[1] is None


class AfterBatchStatistics(nn.Module):
    """A parameter used on activations normalised with batch statistics."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.w = nn.Parameter(torch.rand(D) + 0.5)

    def centred(self, ids):
        x = self.embed(ids)
        return x - x.mean(dim=0, keepdim=True)  # couples the examples

    def forward(self, ids, w=None):
        return self.centred(ids) * (self.w if w is None else w)


def test_batch_statistics_are_refused_in_strict_mode_and_taken_as_given_otherwise():
    torch.manual_seed(2)
    model = AfterBatchStatistics().double()
    ids = torch.randint(0, V, (5, 4))
    with pytest.raises(RuntimeError, match=r"\['w'\].*batch statistics.*strict=False"):
        _exact(model, [model.w], ids, _lm_loss)
    got = _exact(model, [model.w], ids, _lm_loss, strict=False)
    # The batch's centred activations as given, one copy of w per example.
    x = model.centred(ids).detach()
    copies = model.w.detach().expand(5, D).clone().requires_grad_(True)
    loss = (x * copies[:, None, :]).pow(2).mean(dim=(1, 2)).sum()
    (want,) = torch.autograd.grad(loss, copies)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_a_module_rule_after_batch_statistics_keeps_its_rows():
    """LayerNorm (an Opacus rule) after a batch centring: its per-example gradients are defined
    (the statistics come before it), and the rule reads the rows from the data flow."""
    torch.manual_seed(3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.norm = nn.LayerNorm(D)

        def forward(self, ids):
            x = self.embed(ids)
            return self.norm(x - x.mean(dim=0, keepdim=True))

    model = Model().double()
    ids = torch.randint(0, V, (4, 5))
    assert OPACUS is not None
    got = _exact(model, [model.norm], ids, _lm_loss)
    x = (lambda e: e - e.mean(dim=0, keepdim=True))(model.embed(ids)).detach()
    want = []
    for i in range(4):
        y = model.norm(x[i : i + 1]).pow(2).mean()
        grads = torch.autograd.grad(y, [model.norm.weight, model.norm.bias])
        want.append(torch.cat([g.reshape(-1) for g in grads]))
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-6, atol=1e-9)


def test_functional_embedding_with_frequency_scaling_is_refused_by_name():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(V, D))

        def forward(self, ids):
            return F.embedding(ids, self.table, scale_grad_by_freq=True)

    model = Scaled()
    est = FullGradientTracInSDI(model=model, target_modules=[model])
    with pytest.raises(RuntimeError, match=r"\['table'\].*scale_grad_by_freq.*other"):
        est._featurizer.compute_batch(torch.randint(0, V, (3, 4)), _lm_loss)
    est.close()


@pytest.mark.parametrize("B", [1, 4])
def test_the_batch_is_followed_through_a_gather_over_the_examples_in_order(B):
    """HF's padding mask, ``mask[arange(B)[:, None, None, None], kv[None, None, None, :]]``, and
    ``x[arange(B), last]``: the batch lands where its index runs; other gathers are unknown."""

    class Tags(Scope):
        pass

    T = 5
    mask = torch.ones(B, T, dtype=torch.long)
    x = torch.randn(B, T, 3)
    with CaptureMode(Tags()) as mode:
        mode.seed((mask, x), 0)
        b = torch.arange(B)
        kv = torch.arange(T)
        gathered = mask[b[:, None, None, None], kv[None, None, None, :]]  # (B, 1, 1, T)
        last = x[b, torch.full((B,), T - 1)]  # (B, 3)
        moved = x[:, kv[:2]]  # batch not indexed, before the block
        zero = torch.zeros(1, 1, dtype=torch.long)
        after = x.transpose(0, 1)[kv[:2, None], :, zero]  # (2, 1, B): indices first, then batch
        shuffled = x[b.flip(0)]  # examples reordered: not followed
    assert gathered.shape == (B, 1, 1, T) and getattr(gathered, _TAG)[1] == 0
    assert getattr(last, _TAG)[1] == 0 and getattr(moved, _TAG)[1] == 0
    assert after.shape == (2, 1, B) and getattr(after, _TAG)[1] == 2
    assert getattr(shuffled, _TAG)[1] == (0 if B == 1 else None)
