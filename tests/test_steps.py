"""Steps from the forward timeline (issue 11, point 3): loops of several layers, modules acting in
only some passes, prelude/readout, ambiguous patterns, and the inspectable StepPlan.

Per-step features are checked against plain autograd on an unrolled loop: every pass gets its own
copy of the loop layers' parameters, so the gradient w.r.t. copy ``p`` is exactly the gradient of
the uses in pass ``p``.
"""

from __future__ import annotations

import looped_lm
import pytest
import torch
import torch.nn as nn
from conftest import per_use_grads, stacked
from looped_lm import LoopedLM, assert_rel_close, lm_loss
from torch.func import functional_call

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.featurize import Featurizer
from sdi.toy import next_token_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from looped_lm.one_thread()


def _tokens(n, seed, vocab=23, T=8):
    return {
        "tokens": torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))
    }


def _unrolled_per_pass_grads(model: LoopedLM, names, batch) -> torch.Tensor:
    """``(N, passes, P)``: per-example gradients of each pass's copy of the layers' parameters."""
    rows = []
    for i in range(batch["tokens"].shape[0]):
        tokens = batch["tokens"][i : i + 1]
        copies = [
            [
                {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
                for layer in model.layers
            ]
            for _ in range(model.passes)
        ]
        T = tokens.shape[1]
        x = model.embed(tokens)
        for p in range(model.passes):
            for layer, params in zip(model.layers, copies[p], strict=True):
                x = functional_call(layer, params, (x, p), {"mask": model.mask[:, :T, :T]})
        logits = model.head(model.norm(x))[:, :-1]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).sum()
        flat = [(p, j, k) for p in range(model.passes) for j, k in names]
        leaves = [copies[p][j][k] for p, j, k in flat]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        per_pass = [[] for _ in range(model.passes)]
        for (p, _, _), leaf, g in zip(flat, leaves, grads, strict=True):
            per_pass[p].append((torch.zeros_like(leaf) if g is None else g).reshape(-1))
        rows.append(torch.stack([torch.cat(r) for r in per_pass]))
    return torch.stack(rows)


def test_gate_from_the_second_pass_lands_in_its_passes():
    torch.manual_seed(1)
    model = LoopedLM().eval()
    batch = _tokens(3, seed=2)
    est = FullGradientTracInSDI(model=model, target_modules=list(model.layers))
    feats = est.featurize_loader(loader=[batch], loss_fn=lm_loss)
    plan = est.step_plan
    assert feats.steps == plan.steps == 3
    assert plan.slots[model.layers[0].gate] == [1, 2]
    assert plan.slots[model.layers[1].moe] == [0, 1, 2]
    assert plan.labels == ["pass 0", "pass 1", "pass 2"]
    text = str(plan)
    assert "layers.0.gate" in text and "2 uses -> steps [1, 2]" in text
    # Unused in pass 0: exactly zero there; every step against the unrolled loop.
    assert feats.phi["layers.1.gate.weight"][:, 0].eq(0).all()
    names = [(j, k) for j, layer in enumerate(model.layers) for k, _ in layer.named_parameters()]
    ours = torch.cat([feats.phi[f"layers.{j}.{k}"].reshape(3, 3, -1) for j, k in names], dim=2)
    want = _unrolled_per_pass_grads(model, names, batch)
    assert want[:, 1:].abs().amax() > 0
    for p in range(3):  # each step on its own scale
        assert_rel_close(ours[:, p], want[:, p], 1e-4)
    est.close()


class _Loop(nn.Module):
    """Two Linear layers per pass, 3 passes; an early-exit head after pass 1; embed/readout."""

    def __init__(self, d=6, early_exit=True):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d)
        self.exit = nn.Linear(d, 1)
        self.out = nn.Linear(d, 1)
        self.early_exit = early_exit

    def forward(self, x):
        x = self.inp(x)
        extra = 0
        for p in range(3):
            x = self.l2(torch.tanh(self.l1(x)))
            if self.early_exit and p == 1:
                extra = self.exit(x)
        return self.out(x) + extra


def _loss(m, x):
    return m(x).pow(2).sum(dim=(1, 2))


def _plan(model, targets, **kw):
    f = Featurizer(model=model, target_modules=targets, projection_size=None, **kw)
    try:
        out, steps = f.compute_batch(torch.randn(4, 3, 6), _loss)
        return f.step_plan, out, f
    finally:
        f.close()


def test_several_layers_per_pass_give_one_step_per_pass():
    model = _Loop(early_exit=False)
    plan, out, _ = _plan(model, [model.l1, model.l2])
    assert plan.steps == 3 and plan.slots[model.l1] == plan.slots[model.l2] == [0, 1, 2]


def test_early_exit_head_lands_in_its_pass_and_prelude_readout_keep_their_meaning():
    model = _Loop()
    plan, out, f = _plan(model, [model.l1, model.l2, model.exit])
    assert plan.steps == 3 and plan.slots[model.exit] == [1]
    cols = next(b.columns for b in f.blocks if b.name == "exit.weight")
    assert out[:, [0, 2], cols].eq(0).all() and out[:, 1, cols].abs().amax() > 0
    targets = [model.inp, model.l1, model.l2, model.exit, model.out]
    with pytest.raises(RuntimeError, match="allow_mixed_steps"):
        _plan(model, targets)
    plan, _, _ = _plan(model, targets, allow_mixed_steps=True)
    assert plan.labels == ["prelude", "pass 0", "pass 1", "pass 2", "readout"]
    assert plan.slots[model.inp] == [0] and plan.slots[model.out] == [4]
    assert plan.slots[model.exit] == [2] and plan.slots[model.l1] == [1, 2, 3]


class _Interleaved(nn.Module):
    """``a`` runs three times, then ``b`` three times, then ``c`` once in between: no passes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        for _ in range(3):
            x = self.a(x)
        x = self.c(x)
        for _ in range(3):
            x = self.b(x)
        return x


def test_ambiguous_patterns_are_errors_showing_the_counts():
    model = _Interleaved()
    with pytest.raises(RuntimeError, match=r"do not run pass after pass.*use counts \[1, 3\]"):
        _plan(model, [model.a, model.b, model.c])
    # Equal counts keep the classic meaning, however the uses interleave: use t -> step t.
    plan, _, _ = _plan(model, [model.a, model.b])
    assert plan.steps == 3 and plan.slots[model.b] == [0, 1, 2]


def test_step_plan_docstring_example_is_what_print_shows():
    """The example in sdi.steps' docstring is this model's real plan."""
    import sdi.steps

    torch.manual_seed(0)
    model = LoopedLM(layers=2)
    targets = [model.embed, model.layers[0].gate, model.layers[0].attn, model.layers[1].attn]
    est = FullGradientTracInSDI(model=model.eval(), target_modules=targets, allow_mixed_steps=True)
    est.featurize_loader(loader=[_tokens(2, seed=0)], loss_fn=lm_loss)
    shown = str(est.step_plan)
    est.close()
    for line in shown.splitlines():
        assert line in sdi.steps.__doc__, line


def test_mixed_steps_bin_prelude_and_readout(tmp_path, model, train_batches):
    targets = [model.embed, model.core, model.head]
    with pytest.raises(RuntimeError, match="allow_mixed_steps"):
        FullGradientTracInSDI(model=model, target_modules=targets).featurize_loader(
            loader=train_batches, loss_fn=next_token_loss
        )
    est = FullGradientTracInSDI(model=model, target_modules=targets, allow_mixed_steps=True)
    feats = est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    assert feats.steps == model.loop_steps + 2
    spread = {k: v.flatten(2).norm(dim=(0, 2)) for k, v in feats.phi.items()}
    assert spread["embed.weight"][1:].eq(0).all() and spread["embed.weight"][0] > 0
    assert spread["head.weight"][:-1].eq(0).all() and spread["head.weight"][-1] > 0
    core = torch.cat(
        [feats.phi[f"core.{k}"].flatten(2) for k, _ in model.core.named_parameters()], 2
    )
    torch.testing.assert_close(
        core[:, 1:-1], per_use_grads(model, stacked(train_batches)), rtol=1e-4, atol=1e-6
    )


def test_expected_steps(model, train_batches):
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=16, expected_steps=3
    )
    assert est.featurize_loader(loader=train_batches, loss_fn=next_token_loss).steps == 3
    est.close()
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=16, expected_steps=5
    )
    with pytest.raises(RuntimeError, match="observed 3 loop steps but expected_steps=5"):
        est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
