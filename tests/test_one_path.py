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
from looped_lm import per_example_grads

from sdi import FullGradientTracInSDI
from sdi.capture import _TAG, Batched, CaptureMode, OpUse, Scope
from sdi.featurize import Featurizer
from sdi.rules import GENERIC, OPACUS, RULES

V, D = 11, 6


def _per_example_grads(model, params, ids, loss_of) -> torch.Tensor:
    """``(B, sum numel)``: d loss_i / d params, one example at a time (a batch of one)."""
    return per_example_grads(model, params, loss_of, [ids])


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
    args: dict[str, tuple] = {}  # by use name: its recorded arguments (released after the rule)
    record = Featurizer._on_grad

    def spy(self, use, g):
        seen.append(use)
        args[use.name] = use.args
        record(self, use, g)

    monkeypatch.setattr(Featurizer, "_on_grad", spy)
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
    x = args["Gain"][0]
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


class SharedExpertMoE(nn.Module):
    """Qwen2-MoE's pattern, written here: a shared expert and a router run on the flattened
    tokens ``x.view(-1, d)`` (the batch merged with the positions), routed experts from a bank
    picked by ``torch.where``, the sum reshaped back."""

    def __init__(self, d: int, f: int, experts: int):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.shared = nn.Sequential(nn.Linear(d, f), nn.SiLU(), nn.Linear(f, d))
        self.bank = nn.Parameter(torch.randn(experts, f, d) / d**0.5)
        self.out = nn.Parameter(torch.randn(experts, d, f) / f**0.5)

    def forward(self, x):
        B, T, d = x.shape
        flat = x.view(-1, d)
        best = self.router(flat).softmax(-1).argmax(-1)  # (B*T,)
        routed = torch.zeros_like(flat)
        for e in range(self.bank.shape[0]):
            (rows,) = torch.where(best == e)
            h = F.gelu(F.linear(flat[rows], self.bank[e]))
            routed = routed.index_add(0, rows, F.linear(h, self.out[e]))
        return (routed + self.shared(flat)).reshape(B, T, d)


class MoELM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)  # in the second pass, after the first pass's MoE
        self.moe = SharedExpertMoE(D, 7, experts=3)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(2):
            x = x + self.moe(self.norm(x))
        return x


def test_uses_on_merged_tokens_are_served_by_the_enclosing_call_that_has_the_batch():
    """The shared expert's and the router's Linears see ``(B*T, d)``: the innermost running call
    whose arguments carry the batch (the MoE block) is recomputed example by example for every
    selected parameter inside it; the LayerNorm after it keeps its Opacus rule."""
    torch.manual_seed(4)
    model = MoELM().double().eval()
    ids = torch.randint(0, V, (3, 5))
    params = [*model.moe.parameters(), *model.norm.parameters()]  # the selection's order
    f = Featurizer(model=model, target_modules=[model.moe, model.norm], projection_size=None)
    try:
        got, steps = f.compute_batch(ids, _lm_loss, sum_steps=True)
        assert steps == 2 and f.rules.rule_of(model.moe) is GENERIC
        assert set(f._module_params) == {model.moe, model.norm}
    finally:
        f.close()
    want = _per_example_grads(model, params, ids, _lm_loss)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)


def test_an_hf_moe_block_on_flattened_tokens_equals_per_example_autograd():
    """transformers' Qwen2-MoE decoder layer: the shared expert (nn.Linear) and the router run on
    ``hidden_states.view(-1, d)``, the experts through a functional kernel over a 3-D bank."""
    import transformers  # a test dependency: the `hf` extra

    torch.manual_seed(5)
    config = transformers.Qwen2MoeConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = transformers.Qwen2MoeForCausalLM(config).eval()  # float32: the expert kernel's dtype
    ids = torch.randint(0, V, (3, 6))

    def loss(m, batch):
        logits = m(input_ids=batch).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)

    layer = model.model.layers[1]
    params = [p for p in layer.parameters() if p.requires_grad]
    got = _exact(model, layer, ids, loss)
    want = _per_example_grads(model, params, ids, loss)
    rel = float((got.double() - want.double()).norm() / want.double().norm())
    assert rel < 1e-5, rel


class ScaleNorm(nn.Module):
    """RMS-normalised ``x * w``: captured at the broadcast product."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class AfterAnMoE(nn.Module):
    """An unselected MoE layer, then the selected layer: its input comes from routed tokens summed
    back, a batch the data flow cannot follow; the selected call's layout gives it back."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.moe = SharedExpertMoE(D, 7, experts=3)
        self.layer = nn.Sequential(ScaleNorm(D), nn.Linear(D, D))

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.moe(x)
        return self.layer(x)


def test_the_batch_lost_in_an_unselected_moe_is_the_declared_one_at_the_selected_call():
    torch.manual_seed(6)
    model = AfterAnMoE().double().eval()
    ids = torch.randint(0, V, (3, 5))
    f = Featurizer(model=model, target_modules=model.layer, projection_size=None)
    try:
        got, _ = f.compute_batch(ids, _lm_loss, sum_steps=True)
        assert f._fallbacks == []  # every use captured at its operation: none recomputed
    finally:
        f.close()
    want = _per_example_grads(model, list(model.layer.parameters()), ids, _lm_loss)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-8)
