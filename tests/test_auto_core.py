"""``target_modules="auto"`` (sdi/auto_core.py): the looped core found from one forward pass.

On ALBERT (one shared layer group), HRM-text (L and H stacks run 4 and 2 times: an ambiguity
error), the multi-layer loop of tests/looped_lm.py (two loop layers, a gate from the second pass
on) and the toy model; the estimators with ``"auto"`` give what the explicit core gives.
"""

from __future__ import annotations

import capture_models as cm
import looped_lm
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from capture_oracle import exact_tracin_sdi, per_step_gradients
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
    path = save_checkpoint(tmp_path / "ck.pt", model)  # learning rate 1
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


# The patterns of the capture issue (tests/capture_models.py): the looped core computes with
# parameters it does not own (bank slices, a parent's weight) or through its children's weights.


def _frozen_vector_bank_unet() -> nn.Module:
    """(c) with the blocks' own vectors frozen: the band blocks own no trainable parameter, and
    compute only with the bank slices their parent passes them."""
    model = cm.BankUNetGPT(band_passes=3)
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    return model


class _Mix(nn.Module):
    """Owns nothing: mixes the stream with a weight passed in."""

    def forward(self, x, w):
        return x + torch.tanh(F.linear(x, w))


class _PassedWeightLM(nn.Module):
    """A parameterless block looped 3 times with the parent's ``w`` (a parent-owned weight)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(cm.VOCAB, cm.D)
        self.w = nn.Parameter(torch.randn(cm.D, cm.D) / cm.D)
        self.mix = _Mix()
        self.head = nn.Linear(cm.D, cm.VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for _ in range(3):
            x = self.mix(x, self.w.T)
        return self.head(x)


# name -> (model, the looped modules expected: the outermost modules run 3 times with parameters)
PATTERNS = {
    "a_functional_children": (lambda: cm.FunctionalChildLM(3), lambda m: [m.core]),
    "b_casted_gpt": (lambda: cm.LoopedGPT(casted=True), lambda m: [m.core]),
    "c_bank_unet": (lambda: cm.BankUNetGPT(band_passes=3), lambda m: [m.blocks[2], m.blocks[3]]),
    "c_bank_unet_frozen_vectors": (_frozen_vector_bank_unet, lambda m: [m.blocks[2], m.blocks[3]]),
    "d_tied": (lambda: cm.TiedLM(3), lambda m: [m.core]),
    "e_arguments": (lambda: cm.ArgumentLM(d=6, seq=cm.SEQ), lambda m: list(m.blocks)),
    "f_encoder_layer": (lambda: cm.EncoderLayerLM(3), lambda m: [m.core]),
    "h_keyword": (lambda: cm.KeywordLM(), lambda m: [m.core]),
    "h_weight_norm": (lambda: cm.KeywordLM(reparametrised=True), lambda m: [m.core]),
    "parent_weight_passed": (_PassedWeightLM, lambda m: [m.mix]),
}


def _band_slices(model):
    """The oracle's rule for the frozen-vector band: the band's bank slices, nothing else."""
    slices = model.band_slices()
    return lambda a: a.name in slices and a.index in slices[a.name]


# Cores that own no trainable parameter: the estimators' TracIn is also checked against the
# per-use autograd oracle of tests/capture_oracle.py (which accesses count).
ORACLE_COUNTED = {
    "c_bank_unet_frozen_vectors": _band_slices,
    "parent_weight_passed": lambda model: lambda a: a.name == "w",
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_capture_pattern_core_and_exact_tracin(name, tmp_path, capsys):
    torch.manual_seed(sum(map(ord, name)))
    make, expected = PATTERNS[name]
    model = make().double().eval()
    want_modules = expected(model)
    train, query = cm.token_batches(5, 3, seed=1), cm.token_batches(3, 3, seed=2)
    core = find_looped_core(model, query[0], cm.lm_loss)
    assert core.modules == want_modules and core.uses == 3 and core.plan.steps == 3

    path = save_checkpoint(tmp_path / "ck.pt", model)  # learning rate 1
    run = dict(checkpoints=[path], train_loader=train, query_loader=query, loss_fn=cm.lm_loss)
    explicit = FullGradientTracInSDI(model=model, target_modules=want_modules)
    want = explicit.influence_across_checkpoints(**run)
    explicit.close()
    auto = FullGradientTracInSDI(model=model, target_modules="auto")
    got = auto.influence_across_checkpoints(**run)
    auto.close()
    assert ", ".join(core.names) + " -- 3 uses each" in capsys.readouterr().err
    assert want.tracin.abs().max() > 0
    torch.testing.assert_close(got.tracin, want.tracin, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.sdi, want.sdi, rtol=1e-10, atol=0)
    if name in ORACLE_COUNTED:
        counted = ORACLE_COUNTED[name](model)
        grads = [
            per_step_gradients(model, cm.lm_loss, batches, counted, lambda a: a.k, 3)
            for batches in (train, query)
        ]
        oracle_tracin, oracle_sdi = exact_tracin_sdi(*grads)
        torch.testing.assert_close(got.tracin.double(), oracle_tracin, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got.sdi.double(), oracle_sdi, rtol=1e-5, atol=1e-8)


def test_a_repeated_module_computing_with_no_trainable_parameter_is_no_core(tmp_path):
    model = _PassedWeightLM().double().eval()
    model.w.requires_grad_(False)  # `mix` runs 3 times, with a frozen weight only
    batches = cm.token_batches(3, 3, seed=2)
    with pytest.raises(NoLoopedCoreError, match="no module that computes with trainable"):
        find_looped_core(model, batches[0], cm.lm_loss)
    est = FullGradientTracInSDI(model=model, target_modules=[model.mix])  # accepted: calls may
    with pytest.raises(ValueError, match="no operation inside their calls computed with one"):
        est.influence_across_checkpoints(
            checkpoints=[save_checkpoint(tmp_path / "ck.pt", model)],
            train_loader=batches,
            query_loader=batches,
            loss_fn=cm.lm_loss,
        )
    est.close()
