"""``target_modules="auto"`` (sdi/auto_core.py): the looped core found from one forward pass.

On ALBERT (one shared layer group), HRM-text (L and H stacks run 4 and 2 times: an ambiguity
error), the multi-layer loop of tests/looped_lm.py (two loop layers, a gate from the second pass
on) and the toy model; the estimators with ``"auto"`` give what the explicit core gives.
"""

from __future__ import annotations

import looped_lm
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import save_checkpoint, tiny_model
from looped_lm import LoopedLM, lm_loss
from test_hf_models import _albert, _batches, _hf_loss, _hrm

from sdi import FullGradientTracInSDI, ProjectedTracInSDI, find_looped_core
from sdi.auto_core import AmbiguousCoreError, NoLoopedCoreError
from sdi.toy import next_token_loss, random_token_batches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from looped_lm.one_thread()


def test_albert_core_is_its_shared_layer_group():
    torch.manual_seed(0)
    model, group, layers = _albert()  # 3 hidden layers, one shared group
    core = find_looped_core(model, _batches(2, seed=1)[0], _hf_loss)
    assert core.modules == [group] and core.names == ["albert.encoder.albert_layer_groups.0"]
    assert core.uses == layers and core.plan.steps == layers
    owners = {name for m, name in core.plan.names.items()}
    assert "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query" in owners
    assert all(slots == list(range(layers)) for slots in core.plan.slots.values())
    assert "StepPlan: 3 steps" in str(core)


def test_hrm_text_stacks_are_ambiguous_and_the_error_says_how_to_choose():
    torch.manual_seed(0)
    model = _hrm()[0]  # H_cycles=2; L_bp_cycles=[2, 2]: L runs 4 times with gradients (6 in all)
    with pytest.raises(AmbiguousCoreError) as err:
        find_looped_core(model, _batches(2, seed=1)[0], _hf_loss)
    text = str(err.value)
    assert "model.L_module  HrmTextStack: 4 uses" in text
    assert "model.H_module  HrmTextStack: 2 uses" in text
    assert "target_modules=model.get_submodule('model.L_module')" in text
    assert "--target-modules model.L_module" in text


def test_multi_layer_loop_core_is_its_loop_layers():
    torch.manual_seed(0)
    model = LoopedLM(vocab=41, max_len=8, layers=2, passes=3).eval()
    core = find_looped_core(model, _batches(2, seed=1)[0], lm_loss)
    assert core.modules == list(model.layers) and core.uses == 3
    plan = core.plan
    assert plan.steps == 3
    assert plan.slots[model.layers[0].gate] == [1, 2]  # the gate acts from the second pass on
    assert plan.slots[model.layers[1].attn.qkv] == [0, 1, 2]


@pytest.mark.parametrize("steps", [2, 5])
def test_toy_core(steps):
    model = tiny_model(steps=steps)
    batch = random_token_batches(2, 2, 7, 19, seed=0)[0]
    core = find_looped_core(model, batch, next_token_loss)
    assert core.modules == [model.core] and core.uses == steps and core.plan.steps == steps


def test_detection_leaves_modes_and_grads_alone():
    model = tiny_model().train()
    model.core.eval()  # a mixed state, restored module by module
    batch = random_token_batches(2, 2, 7, 19, seed=0)[0]
    find_looped_core(model, batch, next_token_loss)
    assert model.training and not model.core.training and model.embed.training
    assert all(p.grad is None for p in model.parameters())


class _Unlooped(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(19, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 8)  # applied functionally, 3 times
        self.head = nn.Linear(8, 19)

    def forward(self, tokens):
        x = self.embed(tokens)
        for _ in range(3):
            x = x + torch.tanh(F.linear(x, self.w))
        return self.head(x)


def test_functional_loop_is_reported_with_the_way_out():
    batch = random_token_batches(2, 2, 7, 19, seed=0)[0]
    with pytest.raises(NoLoopedCoreError, match="pass target_modules explicitly"):
        find_looped_core(_Unlooped(), batch, next_token_loss)


def test_model_run_twice_by_the_loss_is_refused():
    model = tiny_model()
    batch = random_token_batches(2, 2, 7, 19, seed=0)[0]

    def twice(m, b):
        return next_token_loss(m, b) + next_token_loss(m, b)

    with pytest.raises(ValueError, match="ran the whole model 2 times"):
        find_looped_core(model, batch, twice)


@pytest.mark.parametrize("cls", [ProjectedTracInSDI, FullGradientTracInSDI])
def test_estimator_auto_equals_the_explicit_core(cls, tmp_path, capsys):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "ck.pt", model, lr=0.3)
    train = random_token_batches(5, 3, 7, 19, seed=1)
    query = random_token_batches(3, 3, 7, 19, seed=2)
    run = dict(checkpoints=[path], train_loader=train, query_loader=query, loss_fn=next_token_loss)
    explicit = cls(model=model, target_modules=model.core)
    want = explicit.influence_across_checkpoints(**run)
    explicit.close()
    auto = cls(model=model, target_modules="auto")
    assert auto.step_plan is None and auto.model is model  # nothing resolved before data
    got = auto.influence_across_checkpoints(**run)
    printed = capsys.readouterr().err
    assert "looped core (target_modules='auto'): core -- 3 uses each" in printed
    assert "StepPlan: 3 steps" in printed and auto.step_plan.steps == 3
    torch.testing.assert_close(got.sdi, want.sdi)
    torch.testing.assert_close(got.tracin, want.tracin)
    top = auto.top_influences(k=2, **run)  # resolved once: no second detection
    assert "looped core" not in capsys.readouterr().err
    assert top.most_indices.shape == (3, 2)
    auto.close()


def test_estimator_auto_refuses_a_one_shot_loader():
    model = tiny_model()
    est = ProjectedTracInSDI(model=model, target_modules="auto", projection_size=64)
    batches = iter(random_token_batches(2, 2, 7, 19, seed=0))
    with pytest.raises(TypeError, match="not re-iterable"):
        est.featurize_loader(loader=batches, loss_fn=next_token_loss)


def test_other_strings_are_refused():
    with pytest.raises(ValueError, match="only string accepted is 'auto'"):
        ProjectedTracInSDI(model=tiny_model(), target_modules="core")
