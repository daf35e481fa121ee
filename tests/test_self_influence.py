"""Self-influence (``train_loader is query_loader``): the set is featurised once per checkpoint, and
every output is bitwise equal to featurising it twice (the same batches as two loader objects)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model, two_checkpoints

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.rules.modes import SketchRules
from sdi.toy import next_token_loss, random_token_batches

VOCAB, SEQ = 19, 7


class ForwardCounter:
    """Counts the model's forward passes with a forward hook (the loss_fn stays unfingerprinted)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def close(self):
        self._handle.remove()


def estimator(kind: str, model):
    if kind == "exact":
        return FullGradientTracInSDI(model=model, target_modules=model.core)
    return ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=40, seed=3)


def outputs_of(kind, model, specs, train, query, **kw):
    """``(InfluenceOutputs, forward passes)`` of one call on a fresh estimator."""
    est, counter = estimator(kind, model), ForwardCounter(model)
    try:
        out = est.influence_across_checkpoints(
            checkpoints=specs, train_loader=train, query_loader=query, loss_fn=next_token_loss, **kw
        )
    finally:
        counter.close()
        est.close()
    return out, counter.calls


def assert_bitwise_equal(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            for key in x:
                assert torch.equal(x[key], y[key]), f"{f.name}[{key}]"
        elif x is None:
            assert y is None, f.name
        else:
            assert torch.equal(x, y), f.name  # bitwise: same values, NaN nowhere


@pytest.fixture(params=["explicit", "fft"])
def linear_path(request, monkeypatch):
    """Both Linear weight paths of the CPU: the materialised gradient (chosen at these sizes) and
    the FFT path (forced), whose step sums are formed differently (dense sums vs sketch sums)."""
    if request.param == "fft":
        monkeypatch.setattr(SketchRules, "prefers_explicit", lambda *a, **k: False)
    return request.param


CASES = {
    "sdi": dict(mode="sdi"),
    "tracin": dict(mode="tracin"),
    "step matrix": dict(mode="sdi", with_step_matrix=True),
    "sdi with extras": dict(mode="sdi", by_parameter=True),
}


@pytest.mark.parametrize(
    "kind, path",
    [("projected", "explicit"), ("projected", "fft"), ("exact", None)],  # exact: no sketch path
)
@pytest.mark.parametrize("case", list(CASES))
def test_self_influence_is_bitwise_equal_and_featurises_once(
    tmp_path, monkeypatch, kind, path, case
):
    if path == "fft":  # forced; the explicit path is the cost model's pick at these sizes
        monkeypatch.setattr(SketchRules, "prefers_explicit", lambda *a, **k: False)
    kw = dict(CASES[case])
    if case == "sdi with extras" and kind == "projected":
        kw["with_standard_errors"] = True
    model = tiny_model(steps=3)
    specs = two_checkpoints(tmp_path, 0.5, -1.5)[2]
    batches = random_token_batches(7, 3, SEQ, VOCAB, seed=21)  # 3 batches, the last one ragged
    twice, calls_twice = outputs_of(kind, model, specs, batches, list(batches), **kw)
    once, calls_once = outputs_of(kind, model, specs, batches, batches, **kw)
    assert_bitwise_equal(once, twice)
    assert calls_twice == 2 * 2 * len(batches)  # per checkpoint: query pass + train pass
    assert calls_once == 2 * len(batches)  # per checkpoint: one pass


def test_both_layouts_of_one_backward_equal_their_own_featurisations(linear_path):
    """``compute_batch_both`` returns bitwise what ``compute_batch`` returns for each layout."""
    model = tiny_model(steps=4)
    est = estimator("projected", model)
    featurizer = est._featurizer
    batch = random_token_batches(5, 5, SEQ, VOCAB, seed=22)[0]
    for _ in range(2):  # the second time every gradient buffer is reused
        per_step, summed, steps = featurizer.compute_batch_both(batch, next_token_loss)
        alone_per_step, _ = featurizer.compute_batch(batch, next_token_loss)
        alone_summed, _ = featurizer.compute_batch(batch, next_token_loss, sum_steps=True)
        assert steps == 4
        assert torch.equal(per_step, alone_per_step)
        assert torch.equal(summed, alone_summed)
    est.close()


@pytest.mark.parametrize("model_name", ["casted GPT", "bank U-Net"])
def test_both_layouts_equal_their_own_featurisations_for_uses_captured_at_the_operation(
    model_name, linear_path
):
    """The same for uses captured at the operation (CastedLinear's ``F.linear``, bank slices,
    per-block vectors): their rules run once per layout too, with separate step-sum buffers."""
    import capture_models as cm

    torch.manual_seed(5)
    if model_name == "casted GPT":
        model = cm.LoopedGPT(casted=True)
        targets = [model.core]
    else:
        model = cm.BankUNetGPT()
        targets = [model.blocks[i] for i in model.band]
    est = ProjectedTracInSDI(model=model.eval(), target_modules=targets, projection_size=24, seed=1)
    featurizer = est._featurizer
    batch = cm.token_batches(4, 4, seed=7)[0]
    for _ in range(2):  # the second time every gradient buffer is reused
        per_step, summed, steps = featurizer.compute_batch_both(batch, cm.lm_loss)
        alone_per_step, _ = featurizer.compute_batch(batch, cm.lm_loss)
        alone_summed, _ = featurizer.compute_batch(batch, cm.lm_loss, sum_steps=True)
        assert steps == 3 and per_step.abs().sum() > 0
        assert torch.equal(per_step, alone_per_step)
        assert torch.equal(summed, alone_summed)
    est.close()


def test_a_store_keeps_its_own_train_features(tmp_path):
    """With ``train_store`` the train side comes from the store (written, then read): no reuse,
    same outputs."""
    model = tiny_model()
    specs = two_checkpoints(tmp_path, 1.0, 2.0)[2]
    batches = random_token_batches(7, 3, SEQ, VOCAB, seed=23)
    plain, _ = outputs_of("projected", model, specs, batches, list(batches))
    for run in ("writes", "reads"):
        stored, calls = outputs_of(
            "projected", model, specs, batches, batches, train_store=tmp_path / "store"
        )
        assert_bitwise_equal(stored, plain)
        per_pass = 2 * len(batches) if run == "writes" else len(batches)
        assert calls == 2 * per_pass, run


def test_a_set_over_one_query_chunk_is_featurised_as_before(tmp_path):
    """Several query chunks: the shared featurisation stops after its first chunk, the pass runs
    as with two loaders (one extra featurised batch per checkpoint), with the same outputs."""
    model = tiny_model()
    specs = two_checkpoints(tmp_path, 1.0, 2.0)[2]
    batches = random_token_batches(7, 3, SEQ, VOCAB, seed=24)
    small = dict(max_query_bytes=1)  # a chunk per query batch
    twice, calls_twice = outputs_of("projected", model, specs, batches, list(batches), **small)
    once, calls_once = outputs_of("projected", model, specs, batches, batches, **small)
    assert_bitwise_equal(once, twice)
    assert calls_once == calls_twice + 2  # the dropped first batch, at each of 2 checkpoints


def test_non_finite_rows_are_reported_for_both_sides(tmp_path):
    model = tiny_model()
    specs = two_checkpoints(tmp_path, 1.0, 1.0)[2][:1]
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")  # every row's loss and features are NaN
    for spec in specs:
        torch.save({"model_state_dict": model.state_dict()}, spec.path)
    batches = random_token_batches(4, 2, SEQ, VOCAB, seed=25)
    with pytest.warns(RuntimeWarning) as caught:
        outputs_of("projected", model, specs, batches, batches)
    loaders = {str(w.message).split(":")[0] for w in caught}
    assert loaders == {"query_loader", "train_loader"}


def test_top_influences_of_a_set_with_itself(tmp_path):
    """top_influences' two passes (TracIn, then the selected pairs' SDI) each featurise the set once."""
    model = tiny_model()
    specs = two_checkpoints(tmp_path, 1.0, -0.5)[2]
    batches = random_token_batches(7, 3, SEQ, VOCAB, seed=26)
    results = {}
    for name, query in (("twice", list(batches)), ("once", batches)):
        est, counter = estimator("projected", model), ForwardCounter(model)
        results[name] = est.top_influences(
            k=2,
            checkpoints=specs,
            train_loader=batches,
            query_loader=query,
            loss_fn=next_token_loss,
        )
        results[name + " calls"] = counter.calls
        counter.close()
        est.close()
    for f in dataclasses.fields(results["once"]):
        a, b = getattr(results["once"], f.name), getattr(results["twice"], f.name)
        assert a is None and b is None or torch.equal(a, b), f.name
    # 2 passes x 2 checkpoints x 3 batches, featurised once instead of twice
    assert results["twice calls"] == 2 * results["once calls"] == 2 * 2 * 2 * 3
