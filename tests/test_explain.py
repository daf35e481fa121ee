"""Pair explanations (sdi.explain): the position split equals autograd with the grad-output masked
to one position, and positions / parameter groups add up to the pair's SDI."""

from __future__ import annotations

import os

os.environ.setdefault(
    "TRITON_INTERPRET", "1"
)  # for the Triton backend test; read at kernel definition

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ESTIMATORS,
    full_grads,
    per_use_grads,
    run_influence,
    save_checkpoint,
    stacked,
    two_checkpoints,
)
from torch.func import grad, vmap

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import next_token_loss, random_token_batches


def _masked(f, copies, x):
    """``sum_p mask_p * f(x; copies[p])``: equal to ``f(x)`` (the copies are equal), and the
    gradient w.r.t. ``copies[p]`` is the vjp of ``f`` with its grad-output masked to position p."""
    out = 0
    for p, params in enumerate(copies):
        y = f(x, params)
        mask = torch.zeros(y.shape[1], dtype=y.dtype)
        mask[p] = 1
        out = out + y * mask.view(1, -1, *([1] * (y.dim() - 2)))
    return out


def _block(model, x, copies):
    """The toy LoopedBlock written out with F ops, every submodule's output split by position."""
    core = model.core
    B, T, D = x.shape
    H = core.n_heads
    qkv = _masked(lambda i, p: F.linear(i, p["qkv.weight"]), copies, x)
    q, k, v = qkv.view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
    x = x + _masked(lambda i, p: F.linear(i, p["proj.weight"]), copies, attn)
    norm = lambda i, p: F.layer_norm(i, (D,), p["norm.weight"], p["norm.bias"], core.norm.eps)  # noqa: E731
    h = _masked(norm, copies, x)
    h = _masked(lambda i, p: F.linear(i, p["fc1.weight"], p["fc1.bias"]), copies, h)
    return x + _masked(lambda i, p: F.linear(i, p["fc2.weight"], p["fc2.bias"]), copies, F.gelu(h))


def per_position_grads(model, tokens):
    """``(N, steps, T, P)``: per example, the gradient of use ``s`` of the core with every
    submodule's grad-output masked to position ``p`` (independent copies per step and position),
    parameters in ``model.core.named_parameters()`` order, flattened."""
    core = {k: v.detach() for k, v in model.core.named_parameters()}
    names = list(core)
    T = tokens.shape[1]
    copies = [[dict(core) for _ in range(T)] for _ in range(model.loop_steps)]

    def loss_one(copies, toks):
        toks = toks[None]
        x = model.embed(toks) + model.pos[: toks.shape[1]]
        for step in copies:
            x = _block(model, x, step)
        logits = model.head(x)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1))

    grads = vmap(grad(loss_one), in_dims=(None, 0))(copies, tokens)
    n = tokens.shape[0]
    return torch.stack(
        [
            torch.stack([torch.cat([g[k].reshape(n, -1) for k in names], 1) for g in step], 1)
            for step in grads
        ],
        1,
    )


def _explain(est, path, train, query, pairs, **kw):
    return est.explain(
        pairs=pairs,
        checkpoints=[CheckpointSpec(path)] if isinstance(path, str) else path,
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
        **kw,
    )


def test_the_block_written_out_is_the_toy_block(model):
    x = torch.randn(2, 7, 12)
    copies = [dict(model.core.named_parameters()) for _ in range(7)]
    torch.testing.assert_close(_block(model, x, copies), model.core(x))


def test_exact_position_split_equals_masked_autograd(tmp_path, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model, lr=0.5)  # weight 0.5
    pairs = [(5, 2), (0, 3), (5, 0)]  # train 5 sits in the second batch, with two queries
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    got = _explain(est, path, train_batches, query_batches, pairs)
    train, query = stacked(train_batches), stacked(query_batches)
    pos_train = per_position_grads(model, train).double().sum(1)  # (N_tr, T, P)
    pos_query = per_position_grads(model, query).double()  # (N_q, steps, T, P)
    g_train = full_grads(model, train).double()
    phi_query = per_use_grads(model, query).double()
    # the split adds up to the per-use gradients: the reference is a decomposition
    torch.testing.assert_close(pos_query.sum(2), phi_query, rtol=1e-5, atol=1e-7)
    for e, (i, j) in zip(got, pairs, strict=True):
        assert (e.train, e.query) == (i, j)
        assert e.positions_train.shape == (7, 3) and e.positions_query.shape == (7, 3)
        want_train = 0.5 * torch.einsum("pd,td->pt", pos_train[i], phi_query[j])
        want_query = 0.5 * torch.einsum("d,tpd->pt", g_train[i], pos_query[j])
        want_sdi = 0.5 * phi_query[j] @ g_train[i]
        torch.testing.assert_close(e.positions_train.double(), want_train, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(e.positions_query.double(), want_query, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(e.sdi.double(), want_sdi, rtol=1e-4, atol=1e-7)
        # the last position predicts nothing: its train-side share is zero (no loss term there)
        assert e.positions_train[-1].abs().max() < 1e-7 < e.positions_train[0].abs().max()


@pytest.mark.parametrize("make", ESTIMATORS)
def test_positions_and_groups_add_up_to_the_pairs_sdi(tmp_path, make, train_batches):
    a, _, specs = two_checkpoints(tmp_path, 0.5, -2.0)
    query = random_token_batches(5, 2, 7, 19, seed=3)
    est = make(model=a, target_modules=a.core)
    groups = {"attention": "qkv|proj", "mlp": "fc"}
    pairs = [(6, 4), (1, 0), (1, 0)]
    got = _explain(est, specs, train_batches, query, pairs, by_parameter=groups)
    dense = run_influence(est, specs, train_batches, query, by_parameter=groups)
    assert torch.equal(got[1].positions_train, got[2].positions_train)  # a repeated pair: same
    for e, (i, j) in zip(got, pairs, strict=True):
        assert e.groups == ("attention", "mlp", "other") and e.by_parameter.shape == (3, 3)
        torch.testing.assert_close(e.sdi, dense.sdi[i, j], rtol=1e-4, atol=1e-6)
        for name, share in zip(e.groups, e.by_parameter, strict=True):
            torch.testing.assert_close(
                share, dense.sdi_by_parameter[name][i, j], rtol=1e-4, atol=1e-6
            )
        torch.testing.assert_close(e.positions_train.sum(0), e.sdi, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e.positions_query.sum(0), e.sdi, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(e.by_parameter.sum(0), e.sdi, rtol=1e-4, atol=1e-6)


def test_projected_positions_approach_the_exact_ones(tmp_path, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    exact = _explain(
        FullGradientTracInSDI(model=model, target_modules=model.core),
        path,
        train_batches,
        query_batches,
        [(2, 1)],
    )[0]
    errors = {}
    for m in (16, 4096):
        runs = [
            _explain(
                ProjectedTracInSDI(
                    model=model, target_modules=model.core, projection_size=m, seed=s
                ),
                path,
                train_batches,
                query_batches,
                [(2, 1)],
            )[0]
            for s in range(3)
        ]
        errors[m] = sum(
            (r.positions_train - exact.positions_train).norm() / exact.positions_train.norm()
            for r in runs
        ) / len(runs)
    assert errors[4096] < 0.25 * errors[16] and errors[4096] < 0.2, errors


def test_bad_pairs_are_named(tmp_path, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    with pytest.raises(IndexError, match="train_loader has 7 rows; explain asked for row 9"):
        _explain(est, path, train_batches, query_batches, [(9, 0)])
    with pytest.raises(IndexError, match="query_loader has 4 rows"):
        _explain(est, path, train_batches, query_batches, [(0, 4)])
    with pytest.raises(ValueError, match="pairs must be"):
        _explain(est, path, train_batches, query_batches, [(0, -1)])
    with pytest.raises(ValueError, match="pairs is empty"):
        _explain(est, path, train_batches, query_batches, [])


def _masked_autograd(model, params, loss_fn, batches, position):
    """Per example, the gradient of ``params`` with the grad-output of every module owning one of
    them masked to ``position`` (plain autograd, one example at a time): ``(N, P)``.

    A forward hook adds ``(mask - 1) * (y_W - y_W.detach())``, ``y_W`` the module re-run on detached
    inputs: the value and the gradient flowing to the inputs are unchanged, the gradient reaching
    the module's own parameters is the masked one.
    """
    owned = {id(p) for p in params}
    owners = [
        m for m in model.modules() if any(id(p) in owned for p in m.parameters(recurse=False))
    ]
    busy = []

    def hook(module, args, output):
        if busy:
            return None
        busy.append(module)
        try:
            again = module(*[a.detach() if torch.is_tensor(a) else a for a in args])
        finally:
            busy.pop()
        mask = torch.zeros(output.shape[1], dtype=output.dtype)
        mask[position] = 1
        mask = mask.view(1, -1, *([1] * (output.dim() - 2)))
        return output + (mask - 1) * (again - again.detach())

    handles = [m.register_forward_hook(hook) for m in owners]
    try:
        rows = []
        for batch in batches:
            for i in range(batch["tokens"].shape[0]):
                loss = loss_fn(model, {"tokens": batch["tokens"][i : i + 1]}).sum()
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)
    finally:
        for h in handles:
            h.remove()


def _hf_pair(tmp_path, model, target, check=None):
    """The exact explanation of pair (2, 1) of a ``transformers`` model over small token batches
    (``check(estimator)`` first, when given), and those batches ``(train, query)``."""
    from test_hf_models import _batches, _hf_loss

    path = save_checkpoint(tmp_path / "ck.pt", model, lr=0.5)
    train, query = _batches(3, seed=1, per_batch=2), _batches(2, seed=2)
    est = FullGradientTracInSDI(model=model, target_modules=target)
    if check is not None:
        check(est)
    (e,) = est.explain(
        pairs=[(2, 1)],
        checkpoints=[CheckpointSpec(path)],
        train_loader=train,
        query_loader=query,
        loss_fn=_hf_loss,
    )
    est.close()
    return e, train, query


def test_hf_albert_position_split_through_the_generic_rule_equals_masked_autograd(
    tmp_path, monkeypatch
):
    import torch.nn as nn
    from looped_lm import per_example_grads
    from opacus.grad_sample.grad_sample_module import GradSampleModule
    from test_hf_models import _albert, _hf_loss

    from sdi.rules import GENERIC, RULES

    for kind in (nn.Linear, nn.Embedding):
        monkeypatch.setitem(RULES, kind, GENERIC)
    monkeypatch.setattr(GradSampleModule, "GRAD_SAMPLERS", {})
    torch.manual_seed(3)
    model, target, _ = _albert()

    def generic_everywhere(est):
        blocks = est._featurizer.blocks
        assert all(est._featurizer.rules.rule_of(b.module) is GENERIC for b in blocks)

    e, train, query = _hf_pair(tmp_path, model, target, check=generic_everywhere)
    params = list(dict.fromkeys(p for p in target.parameters() if p.requires_grad))
    g_train = per_example_grads(model, params, _hf_loss, train)[2]
    g_query = per_example_grads(model, params, _hf_loss, query)[1]
    T = train[0]["tokens"].shape[1]
    want_train = torch.stack(
        [0.5 * _masked_autograd(model, params, _hf_loss, train, p)[2] @ g_query for p in range(T)]
    )
    want_query = torch.stack(
        [0.5 * g_train @ _masked_autograd(model, params, _hf_loss, query, p)[1] for p in range(T)]
    )
    torch.testing.assert_close(want_train.sum(), 0.5 * g_train @ g_query, rtol=1e-4, atol=1e-7)
    # summed over the query's steps (plain autograd has no per-step split)
    torch.testing.assert_close(e.positions_train.sum(1), want_train, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e.positions_query.sum(1), want_query, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e.positions_train.sum(0), e.sdi, rtol=1e-4, atol=1e-6)


def test_top_influences_explains_the_pairs_it_returns(tmp_path, model, train_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    query = random_token_batches(3, 2, 7, 19, seed=5)
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=64, seed=2)
    common = dict(
        k=2,
        checkpoints=[CheckpointSpec(path)],
        train_loader=train_batches,
        query_loader=query,
        loss_fn=next_token_loss,
    )
    top = est.top_influences(explain={"mlp": "fc"}, **common)
    plain = est.top_influences(**common)
    assert plain.most_explanations is None and plain.least_explanations is None
    for side in ("most", "least"):
        indices, sdi = getattr(top, f"{side}_indices"), getattr(top, f"{side}_sdi")
        explanations = getattr(top, f"{side}_explanations")
        assert len(explanations) == 3 and all(len(row) == 2 for row in explanations)
        for j, row in enumerate(explanations):
            for r, e in enumerate(row):
                assert (e.train, e.query) == (int(indices[j, r]), j) and e.groups == (
                    "mlp",
                    "other",
                )
                torch.testing.assert_close(e.sdi, sdi[j, r], rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(e.positions_train.sum(0), e.sdi, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(e.by_parameter.sum(0), e.sdi, rtol=1e-4, atol=1e-6)


def test_triton_backend_explains_like_torch_with_embedding_and_readout(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from sdi.toy import LoopedTransformer

    torch.manual_seed(8)
    model = LoopedTransformer(vocab=23, d_model=12, n_heads=2, loop_steps=2, max_len=4).eval()
    targets = [model.embed, model.core, model.head]  # Embedding prelude, loop, Linear readout
    path = save_checkpoint(tmp_path / "ck.pt", model)
    train = random_token_batches(4, 2, 4, 23, seed=1)
    query = random_token_batches(2, 2, 4, 23, seed=2)
    got = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("SDI_BACKEND", name)
        est = ProjectedTracInSDI(
            model=model, target_modules=targets, projection_size=64, seed=3, allow_mixed_steps=True
        )
        assert est._featurizer.rules.backend.name == name
        (got[name],) = _explain(est, path, train, query, [(3, 1)], by_parameter={"embed": "embed"})
        est.close()
    a, b = got["torch"], got["triton"]
    assert a.positions_train.shape == (4, 4) and a.groups == ("embed", "other")  # 2 loop + 2 slots
    for field in ("sdi", "positions_train", "positions_query", "by_parameter"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.positions_train.sum(0), a.sdi, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.positions_query.sum(0), a.sdi, rtol=1e-4, atol=1e-6)
    assert a.by_parameter[0].abs().max() > 0  # the embedding's share is there


class _HeadGain(torch.nn.Module):
    """A looped block whose per-head gain scales ``(B, T, H, dh)`` -- or the same values laid out
    ``(B, H, T, dh)`` (``heads_first``), as attention code has them -- with as many heads as
    positions, so that only the data flow tells the two dimensions apart."""

    V, D, H, T = 11, 8, 4, 4

    def __init__(self, heads_first: bool):
        super().__init__()
        self.heads_first = heads_first
        self.embed = torch.nn.Embedding(self.V, self.D)
        self.lin = torch.nn.Linear(self.D, self.D)
        self.gain = torch.nn.Parameter(1 + 0.3 * torch.randn(self.H))
        self.head = torch.nn.Linear(self.D, self.V)

    def forward(self, tokens):
        x = self.embed(tokens)
        B, T, D = x.shape
        for _ in range(2):
            y = self.lin(x).view(B, T, self.H, D // self.H)
            if self.heads_first:
                y = (y.transpose(1, 2) * self.gain[:, None, None]).transpose(1, 2)
            else:
                y = y * self.gain[:, None]
            x = x + torch.tanh(y.reshape(B, T, D))
        return self.head(x)


def test_positions_are_found_by_data_flow_not_as_the_dimension_after_the_batch(tmp_path):
    """The same model in two layouts, heads and positions of equal size: the position split of
    the gain's uses is the same whether its output holds the positions second or third."""
    torch.manual_seed(0)
    by_positions = _HeadGain(heads_first=False)
    by_heads = _HeadGain(heads_first=True)
    by_heads.load_state_dict(by_positions.state_dict())
    path = save_checkpoint(tmp_path / "ck.pt", by_positions, lr=0.5)
    train = random_token_batches(6, 3, _HeadGain.T, _HeadGain.V, seed=1)
    query = random_token_batches(4, 2, _HeadGain.T, _HeadGain.V, seed=2)
    got = {}
    for name, model in (("positions", by_positions), ("heads", by_heads)):
        est = FullGradientTracInSDI(model=model, target_modules=[model.gain])
        got[name] = _explain(est, path, train, query, [(4, 1), (0, 3)])
        est.close()
    for a, b in zip(got["positions"], got["heads"], strict=True):
        assert a.positions_train.shape == (_HeadGain.T, 2)
        assert a.positions_train.abs().max() > 0
        torch.testing.assert_close(b.positions_train, a.positions_train, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.positions_query, a.positions_query, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.sdi, a.sdi, rtol=1e-5, atol=1e-7)


def test_a_use_with_no_position_dimension_is_named(tmp_path):
    """A selected use after the positions were summed away has nothing to split: a named error."""

    class Pooled(_HeadGain):
        def forward(self, tokens):
            x = self.embed(tokens).mean(1)  # (B, D): the positions are gone
            x = x * self.gain.repeat(2)
            return self.head(x)[:, None].expand(-1, tokens.shape[1], -1)

    torch.manual_seed(0)
    model = Pooled(heads_first=False)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    batches = random_token_batches(4, 2, _HeadGain.T, _HeadGain.V, seed=1)
    est = FullGradientTracInSDI(model=model, target_modules=[model.gain])
    with pytest.raises(ValueError, match="no position dimension that the data flow establishes"):
        _explain(est, path, batches, batches, [(0, 1)])


def test_hf_gpt2_positions_lost_inside_conv1d_come_back_at_its_output(tmp_path):
    """GPT-2's ``Conv1D`` views its input as ``(B * T, d)`` and back: the data flow loses the
    positions inside the call, and its output gets them back where the call kept its input's
    layout. The split equals masked autograd."""
    import transformers
    from looped_lm import per_example_grads
    from test_hf_models import VOCAB, T, _hf_loss

    torch.manual_seed(3)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=2, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    target = list(model.transformer.h)
    e, train, query = _hf_pair(tmp_path, model, target)
    params = list(dict.fromkeys(p for t in target for p in t.parameters() if p.requires_grad))
    g_query = per_example_grads(model, params, _hf_loss, query)[1]
    want_train = torch.stack(
        [0.5 * _masked_autograd(model, params, _hf_loss, train, p)[2] @ g_query for p in range(T)]
    )
    torch.testing.assert_close(e.positions_train.sum(1), want_train, rtol=1e-4, atol=1e-6)
