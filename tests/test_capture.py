"""Capture at the operation (issue 18): parameters used however the model computes with them.

Each small looped model uses its parameters in one of the ways module hooks cannot see. Exact
features summed over steps must equal per-example gradients from plain autograd (one example at a
time, the parameters themselves requiring grad); projected features must equal the reference
sketch (``sdi.sketch``) of the exact ones, with the estimator's own tables.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from looped_lm import next_token_losses
from torch.nn.utils import prune

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.sketch import CountSketchHash, sketch_matrix_explicit

V, D, T = 11, 6, 5


def _ids(n, seed=0, T=T):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, ids):
    return next_token_losses(model, ids).sum(1)


def oracle(model, params: dict, ids) -> dict:
    """Per-example gradients ``{name: (N, numel)}`` by autograd, one example at a time."""
    out = {k: [] for k in params}
    for i in range(ids.shape[0]):
        with torch.enable_grad():
            grads = torch.autograd.grad(lm_loss(model, ids[i : i + 1]).sum(), list(params.values()))
        for k, g in zip(params, grads, strict=True):
            out[k].append(g.reshape(-1))
    return {k: torch.stack(v) for k, v in out.items()}


def exact(model, targets, ids, **kw):
    est = FullGradientTracInSDI(model=model, target_modules=targets, **kw)
    try:
        feats = est.featurize_loader(loader=[ids], loss_fn=lm_loss)
        return {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in feats.phi.items()}, est
    finally:
        est.close()


def check_exact(model, targets, ids, **kw):
    feats, est = exact(model, targets, ids, **kw)
    named = dict(model.named_parameters())
    want = oracle(model, {k: named[k] for k in feats}, ids)
    for k, f in feats.items():
        scale = want[k].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(f.sum(1) / scale, want[k] / scale, rtol=1e-5, atol=1e-5)
    return feats, est


def check_projected(model, targets, ids, m=64, **kw):
    """Projected features == reference sketch of the exact features, per step (linearity)."""
    feats, _ = exact(model, targets, ids, **kw)
    est = ProjectedTracInSDI(model=model, target_modules=targets, projection_size=m, seed=3, **kw)
    got = est.featurize_loader(loader=[ids], loss_fn=lm_loss)
    f = est._featurizer
    for block in f.blocks:
        table = f.rules.tables[block.param]
        phi = feats[block.name]
        N, S = phi.shape[:2]
        flat = phi.reshape(N * S, -1)
        if isinstance(table, CountSketchHash):
            want = (flat[:, None, :] * 0).sum(-1)  # shape only
            want = torch.zeros(N * S, m).index_add_(1, table.h, flat * table.s)
        else:
            want = sketch_matrix_explicit(flat.reshape(N * S, table.out.d, table.inp.d), table)
        scale = want.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(
            got.phi[block.name].reshape(N * S, m) / scale, want / scale, rtol=1e-4, atol=1e-5
        )
    est.close()
    return got


# (a) a parent calling its children's weights functionally ------------------------------------


def causal_conv(x, weight, bias):
    """``(B, T, d)`` depthwise causal convolution from a ``(d, k)`` kernel (a "kernel function")."""
    k = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[-1])
    return y[..., : x.shape[1]].transpose(1, 2)


class FunctionalParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.conv = nn.Conv1d(D, D, 3, groups=D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            y = causal_conv(x, self.conv.weight.squeeze(1), self.conv.bias)
            x = x + torch.tanh(F.linear(y, self.lin.weight, self.lin.bias))
        return self.head(x)


def test_a_parent_using_child_weights_functionally():
    torch.manual_seed(0)
    model = FunctionalParent().eval()
    feats, est = check_exact(model, [model.conv, model.lin], _ids(4))
    assert feats["conv.weight"].shape[1] == 3  # one step per pass
    check_projected(model, [model.conv, model.lin], _ids(4))


# (b) Linear subclasses that cast ---------------------------------------------------------------


class CastedLinear(nn.Linear):
    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Looped(nn.Module):
    def __init__(self, linear=nn.Linear, passes=3):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.fc1, self.fc2 = linear(D, 2 * D), linear(2 * D, D)
        self.head = nn.Linear(D, V)
        self.passes = passes

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.passes):
            x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x)


def test_casted_linear_is_the_linear_rule():
    torch.manual_seed(0)
    model = Looped(CastedLinear).eval()
    check_exact(model, [model.fc1, model.fc2], _ids(4))
    torch.manual_seed(0)
    plain = Looped().eval()
    ids = _ids(4)
    a = ProjectedTracInSDI(model=model, target_modules=[model.fc1, model.fc2], projection_size=32)
    b = ProjectedTracInSDI(model=plain, target_modules=[plain.fc1, plain.fc2], projection_size=32)
    fa = a.featurize_loader(loader=[ids], loss_fn=lm_loss)
    fb = b.featurize_loader(loader=[ids], loss_fn=lm_loss)
    for k in fb.phi:  # the same tables, the same sketch: the Linear path, not a generic one
        torch.testing.assert_close(fa.phi[k], fb.phi[k], rtol=1e-4, atol=1e-5)
    assert all(m not in a._featurizer._module_params for m in (model.fc1, model.fc2))


# (c) parameter banks -------------------------------------------------------------------------


class BankBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x, q_w, o_w):
        h = torch.tanh(F.linear(x, q_w)) * self.scale
        return x + h @ o_w.t()


class BankUNet(nn.Module):
    """Layers 0 and 4 run once; the band of layers 1-3 is looped 3 times; skip 0 -> 4."""

    def __init__(self, layers=5, loops=3):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.bank = nn.Parameter(torch.randn(2 * layers, D, D) / D**0.5)
        self.blocks = nn.ModuleList(BankBlock() for _ in range(layers))
        self.head = nn.Linear(D, V)
        self.layers, self.loops = layers, loops

    def _block(self, i, x):
        return self.blocks[i](x, q_w=self.bank[i], o_w=self.bank[self.layers + i])

    def forward(self, ids):
        x = skip = self._block(0, self.embed(ids))
        for _ in range(self.loops):
            for i in range(1, self.layers - 1):
                x = self._block(i, x)
        return self.head(self._block(self.layers - 1, x + skip))


def test_bank_slices_land_in_the_bank():
    torch.manual_seed(0)
    model = BankUNet().eval()
    band = [model.blocks[i] for i in (1, 2, 3)]
    # The band selected: the bank is found in use inside the band's calls; only those uses count.
    feats, est = exact(model, band, _ids(4))
    assert est.step_plan.steps == 3 and list(feats)[-1] == "bank"
    want = oracle(model, {"bank": model.bank}, _ids(4))["bank"].reshape(4, 10, -1)
    got = feats["bank"].sum(1).reshape(4, 10, -1)
    inside = [1, 2, 3, 6, 7, 8]
    torch.testing.assert_close(got[:, inside], want[:, inside], rtol=1e-5, atol=1e-6)
    assert got[:, [0, 4, 5, 9]].eq(0).all() and want[:, [0, 4, 5, 9]].abs().amax() > 0
    targets = [model.bank, *model.blocks]
    feats, est = check_exact(model, targets, _ids(4), allow_mixed_steps=True)
    plan = est.step_plan
    assert plan.labels == ["prelude", "pass 0", "pass 1", "pass 2", "readout"]
    assert plan.slots[(model.bank, 2)] == [1, 2, 3] and plan.slots[(model.bank, 0)] == [0]
    assert plan.slots[(model.bank, 9)] == [4]
    check_projected(model, targets, _ids(4), allow_mixed_steps=True)


@pytest.mark.parametrize("B,T_", [(D, T), (4, 4), (2 * D, 2 * D)])
def test_batch_size_equal_to_a_weight_dim_or_the_sequence(B, T_):
    """``B == d`` (a bank slice's first dimension) and ``B == T``: data flow, not sizes."""
    torch.manual_seed(1)
    model = BankUNet(layers=3, loops=2).eval()
    check_exact(model, [model.bank, *model.blocks], _ids(B, T=T_), allow_mixed_steps=True)


# (d) tied embedding and head -------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.core = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight
        self.functional = functional

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(2):
            x = x + torch.tanh(self.core(x))
        return F.linear(x, self.embed.weight) if self.functional else self.head(x)


@pytest.mark.parametrize("functional", [False, True])
def test_tied_embedding_and_head(functional):
    torch.manual_seed(0)
    model = Tied(functional).eval()
    check_exact(model, [model.embed, model.core], _ids(4), allow_mixed_steps=True)
    if not functional:
        check_exact(model, [model.head], _ids(4), allow_mixed_steps=True)
    check_projected(model, [model.embed, model.core], _ids(4), allow_mixed_steps=True)


# (f) nn.TransformerEncoderLayer as the looped core -----------------------------------------------


class UT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.core = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, V)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.core(x)
        return self.head(x)


def test_transformer_encoder_layer_core():
    torch.manual_seed(0)
    model = UT().eval()
    feats, est = check_exact(model, model.core, _ids(3))
    assert feats["core.self_attn.out_proj.weight"].shape[1] == 3
    assert est.step_plan.steps == 3


# (g) a user's forward hook changing a selected module's output -------------------------------------


@pytest.mark.parametrize("before", [True, False])
def test_user_hook_changing_the_output(before):
    torch.manual_seed(0)
    model = Looped(passes=2).eval()
    mask = torch.tensor([1.0, 0.0] * D)

    def ablate(module, args, out):
        return out * mask

    if before:
        model.fc1.register_forward_hook(ablate)
    est = FullGradientTracInSDI(model=model, target_modules=[model.fc1, model.fc2])
    if not before:
        model.fc1.register_forward_hook(ablate)
    feats = est.featurize_loader(loader=[_ids(3)], loss_fn=lm_loss)
    named = dict(model.named_parameters())
    want = oracle(model, {k: named[k] for k in feats.phi}, _ids(3))
    for k, f in feats.phi.items():
        torch.testing.assert_close(f.sum(1).reshape(3, -1), want[k], rtol=1e-5, atol=1e-6)
    assert feats.phi["fc1.weight"][:, :, 1::2].eq(0).all()  # ablated rows: no gradient


# (h) reparametrised weights, keyword calls --------------------------------------------------------


class Reparam(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.qkv = torch.nn.utils.parametrizations.weight_norm(nn.Linear(D, D))
        self.kw = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(2):
            x = x + torch.tanh(self.kw(input=self.qkv(x)))
        return self.head(x)


def test_weight_norm_and_keyword_calls():
    torch.manual_seed(0)
    model = Reparam().eval()
    feats, _ = check_exact(model, [model.qkv, model.kw], _ids(4))
    assert "qkv.parametrizations.weight.original0" in feats
    check_projected(model, [model.qkv, model.kw], _ids(4))


# per-block vectors and the elementwise rule ---------------------------------------------------


class GainBlock(nn.Module):
    """Speed-run GPT style per-block vectors: a residual mix, per-head gains, a scale."""

    def __init__(self):
        super().__init__()
        self.fc = CastedLinear(D, D)
        self.attn_scale = nn.Parameter(torch.rand(D) + 0.5)
        self.resid_mix = nn.Parameter(torch.rand(2, D))
        self.q_gain = nn.Parameter(torch.rand(2, 1, 1) + 0.5)

    def forward(self, x, x0):
        B, T_, _ = x.shape
        mix = self.resid_mix.to(x.dtype)
        x = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        h = torch.tanh(self.fc(x)).view(B, T_, 2, D // 2).transpose(1, 2) * self.q_gain
        return x + self.attn_scale * h.transpose(1, 2).reshape(B, T_, D)


class Gains(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.block = GainBlock()
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = x0 = self.embed(ids)
        for _ in range(3):
            x = self.block(x, x0)
        return self.head(x)


def test_per_block_vectors():
    torch.manual_seed(0)
    model = Gains().eval()
    feats, est = check_exact(model, model.block, _ids(4))
    assert est.step_plan.steps == 3 and est.step_plan.slots[model.block] == [0, 1, 2]
    check_projected(model, model.block, _ids(4))


@pytest.mark.parametrize("build", ["casted", "bank", "gains", "tied"])
def test_step_sums_equal_the_sum_of_steps(build):
    """TracIn's per-pass sums (hashed once per pass where cheaper) == per-step features summed."""
    from sdi.backend import get_backend
    from sdi.featurize import Featurizer

    torch.manual_seed(0)
    model, targets = {
        "casted": lambda: (m := Looped(CastedLinear).eval(), [m.fc1, m.fc2]),
        "bank": lambda: (m := BankUNet().eval(), [m.blocks[i] for i in (1, 2, 3)]),
        "gains": lambda: (m := Gains().eval(), [m.block]),
        "tied": lambda: (m := Tied(True).eval(), [m.embed, m.core]),
    }[build]()
    for explicit in (False, True):
        f = Featurizer(
            model=model,
            target_modules=targets,
            projection_size=48,
            backend=get_backend("torch"),
            allow_mixed_steps=True,
        )
        f.rules.prefers_explicit = lambda *a, e=explicit: e
        ids = _ids(3)
        per_step, _ = f.compute_batch(ids, lm_loss)
        summed, _ = f.compute_batch(ids, lm_loss, sum_steps=True)
        f.close()
        torch.testing.assert_close(summed, per_step.sum(1), rtol=1e-4, atol=1e-5)


class Mixing(nn.Module):
    """A parameter used after an operation that mixes the examples of the batch."""

    def __init__(self, where: str):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.w = nn.Parameter(torch.rand(D) + 0.5)
        self.head = nn.Linear(D, V)
        self.where = where

    def forward(self, ids):
        x = self.embed(ids)
        if self.where == "softmax":
            x = x.softmax(dim=0)  # over the batch
        elif self.where == "batch_norm":
            x = F.batch_norm(x.transpose(1, 2), None, None, training=True).transpose(1, 2)
        return self.head(x * self.w)


@pytest.mark.parametrize("where", ["softmax", "batch_norm"])
def test_a_use_after_mixing_the_examples_is_refused_by_name(where):
    model = Mixing(where).eval()
    with pytest.raises(RuntimeError, match=r"mul.*\[.w.\].*batch statistics.*strict"):
        exact(model, [model], _ids(3))


def test_an_input_changed_in_place_after_its_use_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.w = nn.Parameter(torch.rand(D))
            self.head = nn.Linear(D, V)

        def forward(self, ids):
            x = self.embed(ids) * 1.0
            y = x * self.w
            x.mul_(2.0)  # after the use read it
            return self.head(y + x)

    model = InPlace().eval()
    with pytest.raises(RuntimeError, match="modified in place"):
        exact(model, [model.w], _ids(3))


def test_a_batch_without_tensors_seeds_from_the_model_arguments():
    """``loss_fn`` builds the tensors (tokenising, say): the model's arguments are per-example."""
    torch.manual_seed(0)
    model = Looped(CastedLinear).eval()
    ids = _ids(4)
    est = FullGradientTracInSDI(model=model, target_modules=[model.fc1, model.fc2])
    feats = est.featurize_loader(
        loader=[ids.tolist()], loss_fn=lambda m, rows: lm_loss(m, torch.tensor(rows))
    )
    named = dict(model.named_parameters())
    want = oracle(model, {k: named[k] for k in feats.phi}, ids)
    for k, f in feats.phi.items():
        torch.testing.assert_close(f.sum(1).reshape(4, -1), want[k], rtol=1e-5, atol=1e-6)


class EinsumBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2 * D, D) / D**0.5)  # (out, in)
        self.w_out = nn.Parameter(torch.randn(2 * D, D) / D**0.5)  # (in, out)

    def forward(self, x):
        h = torch.tanh(torch.einsum("btd,ed->bte", x, self.w_in))
        return x + torch.einsum("bte,ed->btd", h, self.w_out)


class EinsumLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.block = EinsumBlock()
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.block(x)
        return self.head(x)


def test_einsum_reducing_to_a_linear_is_the_linear_rule(monkeypatch):
    torch.manual_seed(0)
    model = EinsumLM().eval()
    calls = []
    from sdi.rules import ops

    monkeypatch.setattr(ops, "op_vjp", lambda *a: calls.append(a) or {})  # must not be reached
    check_exact(model, model.block, _ids(4))
    check_projected(model, model.block, _ids(4))
    assert not calls


def test_a_pruned_linear_attributes_its_trained_weight():
    """``prune`` keeps ``weight_orig`` (trained) and computes ``weight = weight_orig * mask``."""
    torch.manual_seed(0)
    model = Looped(passes=2).eval()
    prune.random_unstructured(model.fc1, "weight", amount=0.4)
    feats, _ = check_exact(model, [model.fc1, model.fc2], _ids(3))
    mask = model.fc1.weight_mask.reshape(-1).bool()
    assert feats["fc1.weight_orig"].sum(1)[:, ~mask].eq(0).all()


def test_a_gradient_through_an_operations_second_output_is_refused():
    """``F.multi_head_attention_forward`` returns the attention weights beside its output: a loss
    using them would need their path too, which the rule (first output) does not follow."""

    class WithWeights(nn.Module):
        def __init__(self, use_weights: bool):
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
            self.head = nn.Linear(D, V)
            self.use_weights = use_weights

        def forward(self, ids):
            x = self.embed(ids)
            y, weights = self.mha(x, x, x, need_weights=True)
            out = self.head(y)
            return out + weights.sum(-1, keepdim=True) if self.use_weights else out

    torch.manual_seed(0)
    plain = WithWeights(False).eval()
    check_exact(plain, plain.mha, _ids(3))
    model = WithWeights(True).eval()
    with pytest.raises(RuntimeError, match="output 1 of multi_head_attention_forward"):
        exact(model, model.mha, _ids(3))
