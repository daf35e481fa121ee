"""Issue 20: inputs as people write them -- checkpoints as they are saved, scalar losses, sizes
that cannot fit, sequence-first explain, parameters never used -- either work, saying what was
done, or are refused with an error that names the culprit, where it is, and the fix."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SEQ, VOCAB, save_checkpoint, tiny_model

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.checkpoints import CheckpointMismatchError, CheckpointWarning
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches


def _run(est, checkpoints, train, query, loss_fn=next_token_loss, **kwargs):
    return est.influence_across_checkpoints(
        checkpoints=checkpoints, train_loader=train, query_loader=query, loss_fn=loss_fn, **kwargs
    )


def _est(model, **kwargs):
    return ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=32, **kwargs)


@pytest.fixture
def reference(tmp_path, model, train_batches, query_batches):
    """TracIn of ``model``'s own weights saved the documented way, by a fresh model's estimator."""
    path = save_checkpoint(tmp_path / "plain.pt", model)
    fresh = tiny_model(seed=5)
    return _run(_est(fresh), [CheckpointSpec(path, weight=1.0)], train_batches, query_batches)


# -- item 2: checkpoints as people save them ---------------------------------------------------


def _compiled_state(model):
    """A ``torch.compile``d model's ``state_dict()``: every key prefixed ``_orig_mod.``."""
    return torch.compile(model).state_dict()  # wrapping compiles nothing until it is called


@pytest.mark.parametrize(
    "saved, said",
    [
        (_compiled_state, "removed the prefix '_orig_mod.'"),
        (  # DistributedDataParallel's model.state_dict()
            lambda m: {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
            "removed the prefix 'module.'",
        ),
        (lambda m: {"model": m.state_dict(), "epoch": 3}, "under the key 'model'"),
        (lambda m: {"module": m.state_dict(), "step": 10}, "under the key 'module'"),
        (
            lambda m: {"model": _compiled_state(m), "epoch": 3},
            "under the key 'model' (ignoring ['epoch']) and removed the prefix '_orig_mod.'",
        ),
    ],
    ids=["orig_mod", "ddp", "model-wrapper", "module-wrapper", "both"],
)
def test_unambiguous_checkpoints_load_saying_what_was_done(
    tmp_path, model, train_batches, query_batches, reference, saved, said
):
    path = tmp_path / "saved.pt"
    torch.save(saved(model), path)
    fresh = tiny_model(seed=5)
    with pytest.warns(CheckpointWarning, match=re.escape(said)):
        out = _run(_est(fresh), [CheckpointSpec(path, weight=1.0)], train_batches, query_batches)
    torch.testing.assert_close(out.tracin, reference.tracin)


def _mismatch_error(tmp_path, state, train_batches, query_batches) -> str:
    torch.save(state, tmp_path / "bad.pt")
    fresh = tiny_model(seed=5)
    good = save_checkpoint(tmp_path / "good.pt", fresh)
    with pytest.raises(CheckpointMismatchError) as err:
        _run(
            _est(fresh),
            [CheckpointSpec(good, 1.0), CheckpointSpec(tmp_path / "bad.pt", 1.0)],
            train_batches,
            query_batches,
        )
    message = str(err.value)
    assert message.startswith(f"checkpoints[1] ('{tmp_path / 'bad.pt'}')")  # which one, where
    assert "load_model_state_dict_fn=" in message  # the fix
    return message


def test_left_over_ema_keys_are_named_with_the_checkpoint(
    tmp_path, model, train_batches, query_batches
):
    state = dict(model.state_dict())
    state.update({f"ema.{k}": v.clone() for k, v in model.state_dict().items()})
    message = _mismatch_error(tmp_path, state, train_batches, query_batches)
    assert f"{len(model.state_dict())} keys of the checkpoint are not in the model" in message
    assert "ema.embed.weight" in message and "under ['ema']" in message


def test_missing_keys_are_named(tmp_path, model, train_batches, query_batches):
    state = dict(model.state_dict())
    del state["core.fc1.weight"], state["head.weight"]
    message = _mismatch_error(tmp_path, state, train_batches, query_batches)
    assert "2 of the model's keys are not in the checkpoint" in message
    assert "'core.fc1.weight'" in message and "'head.weight'" in message


def test_another_architectures_shapes_are_listed(tmp_path, train_batches, query_batches):
    wider = LoopedTransformer(vocab=VOCAB, d_model=16, n_heads=2, loop_steps=3, max_len=SEQ)
    message = _mismatch_error(tmp_path, wider.state_dict(), train_batches, query_batches)
    assert "shapes differ" in message
    assert "embed.weight: checkpoint (19, 16), model (19, 12)" in message


def test_a_lightning_style_prefix_is_named_with_the_renaming_fix(
    tmp_path, model, train_batches, query_batches
):
    state = {"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}
    message = _mismatch_error(tmp_path, state, train_batches, query_batches)
    assert "every key of the checkpoint carries the prefix 'net.'" in message
    assert "k.removeprefix('net.')" in message


def test_weights_under_several_known_keys_are_ambiguous(
    tmp_path, model, train_batches, query_batches
):
    state = {"model": model.state_dict(), "module": model.state_dict()}
    message = _mismatch_error(tmp_path, state, train_batches, query_batches)
    assert "several keys ['model', 'module']" in message


def test_torch_error_of_a_custom_state_dict_function_names_the_checkpoint(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", tiny_model(seed=1))
    odd = nn.Module()
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)checkpoints\[0\].*a\.pt.*Unexpected key"
    ):
        _run(
            _est(model),
            [CheckpointSpec(path, 1.0)],
            train_batches,
            query_batches,
            load_model_state_dict_fn=lambda m, ckpt: odd.load_state_dict(ckpt["model_state_dict"]),
        )


# -- item 4: a whole pickled model -------------------------------------------------------------


def test_whole_pickled_model_loads_its_state_dict_once_trusted(
    tmp_path, model, train_batches, query_batches, reference
):
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # before any estimator hooks the model
    fresh = tiny_model(seed=5)
    with pytest.warns(CheckpointWarning, match=r"whole pickled model \(LoopedTransformer\)"):
        out = _run(
            _est(fresh),
            [CheckpointSpec(path, weight=1.0)],
            train_batches,
            query_batches,
            load_checkpoint_fn=lambda p: torch.load(p, weights_only=False),
        )
    torch.testing.assert_close(out.tracin, reference.tracin)


def test_a_model_under_a_key_loads_too(tmp_path, model, train_batches, query_batches, reference):
    path = tmp_path / "wrapped.pt"
    torch.save({"model": model, "epoch": 2}, path)
    with pytest.warns(CheckpointWarning, match="under the key 'model'"):
        out = _run(
            _est(tiny_model(seed=5)),
            [CheckpointSpec(path, weight=1.0)],
            train_batches,
            query_batches,
            load_checkpoint_fn=lambda p: torch.load(p, weights_only=False),
        )
    torch.testing.assert_close(out.tracin, reference.tracin)


def test_a_checkpoint_that_is_no_dict_is_refused_by_name(
    tmp_path, model, train_batches, query_batches
):
    with pytest.raises(TypeError, match=r"checkpoints\[0\].*returned a list.*state_dict"):
        _run(
            _est(model),
            [CheckpointSpec("ck", 1.0)],
            train_batches,
            query_batches,
            load_checkpoint_fn=lambda p: [1, 2],
        )


# -- item 3: the store's identity is the checkpoint's content, not its name --------------------


def test_copied_or_renamed_checkpoint_serves_the_same_store(
    tmp_path, model, train_batches, query_batches
):
    first = save_checkpoint(tmp_path / "ckpt_3.pt", model)
    store = tmp_path / "store"
    want = _run(
        _est(model), [CheckpointSpec(first, 1.0)], train_batches, query_batches, train_store=store
    )
    copy = shutil.copy(first, tmp_path / "best.pt")  # byte-identical, another name
    renamed = tmp_path / "renamed.pt"
    (tmp_path / "ckpt_3.pt").rename(renamed)
    calls = []
    for path in (copy, renamed):
        calls.clear()
        hook = model.core.register_forward_hook(lambda *a: calls.append(1))
        try:
            got = _run(
                _est(model),
                [CheckpointSpec(path, 1.0)],
                train_batches,
                query_batches,
                train_store=store,
            )
        finally:
            hook.remove()
        torch.testing.assert_close(got.sdi, want.sdi)
        # The query batch runs the loop (3 steps); the 3 train batches come from the store.
        assert len(calls) == model.loop_steps
    assert len(list(store.iterdir())) == 1


# -- item 1: a scalar loss with loss_reduction="sum" -------------------------------------------


def _mean_loss(model, batch):  # F.cross_entropy's default: the batch mean, a scalar
    logits = model(batch["tokens"])[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), batch["tokens"][:, 1:].flatten())


def test_scalar_loss_with_sum_warns_once_per_call_naming_both_fixes(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", model)
    est = _est(model)
    for _ in range(2):  # once per call, not once per process or per batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(est, [CheckpointSpec(path, 1.0)], train_batches, query_batches, loss_fn=_mean_loss)
        said = [str(w.message) for w in caught if "returned a scalar" in str(w.message)]
        assert len(said) == 1, said
        assert "per-example losses, shape (B,)" in said[0]
        assert "reduction='none'" in said[0] and "loss_reduction='mean'" in said[0]
        assert caught[0].filename == __file__  # at the user's call


def test_scalar_loss_with_mean_or_vector_loss_is_silent(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(_est(model), [CheckpointSpec(path, 1.0)], train_batches, query_batches)
        _run(
            _est(model, loss_reduction="mean"),
            [CheckpointSpec(path, 1.0)],
            train_batches,
            query_batches,
            loss_fn=_mean_loss,
        )


# -- item 5: parameters never used in the forward pass, three causes ----------------------------


class _Checkpointed(nn.Module):
    """The toy model with its loop body under ``torch.utils.checkpoint``."""

    def __init__(self, model, reentrant: bool):
        super().__init__()
        self.inner, self.reentrant = model, reentrant

    def forward(self, tokens):
        m = self.inner
        x = m.embed(tokens) + m.pos[: tokens.shape[1]]
        for _ in range(m.loop_steps):
            x = torch.utils.checkpoint.checkpoint(m.core, x, use_reentrant=self.reentrant)
        return m.head(x)


def test_reentrant_checkpoint_is_named_and_use_reentrant_false_works(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", model)
    want = _run(_est(model), [CheckpointSpec(path, 1.0)], train_batches, query_batches)
    wrapped = _Checkpointed(model, reentrant=True)
    est = ProjectedTracInSDI(model=wrapped, target_modules=model.core, projection_size=32)
    load = {"load_model_state_dict_fn": lambda m, c: None}  # the inner model holds the weights
    with pytest.raises(RuntimeError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warning about inputs without grad
        _run(est, [CheckpointSpec(path, 1.0)], train_batches, query_batches, **load)
    message = str(err.value)
    assert "use_reentrant=True" in message and "Pass use_reentrant=False" in message
    assert "core.qkv.weight" in message and "no_grad" not in message
    est.close()
    wrapped.reentrant = False
    est = ProjectedTracInSDI(model=wrapped, target_modules=model.core, projection_size=32)
    got = _run(est, [CheckpointSpec(path, 1.0)], train_batches, query_batches, **load)
    torch.testing.assert_close(got.sdi, want.sdi, rtol=1e-4, atol=1e-6)


def test_no_grad_inside_the_model_is_named(model, train_batches):
    est = _est(model)
    with pytest.raises(RuntimeError, match=r"ran with gradients off \(torch.no_grad\(\)"):
        est.featurize_loader(loader=train_batches, loss_fn=_no_grad_model)


def _no_grad_model(m, batch):
    with torch.no_grad():
        logits = m(batch["tokens"])
    return logits.sum(dim=(1, 2)) + torch.zeros(logits.shape[0], requires_grad=True)


class _Halting(nn.Module):
    """A data-dependent loop: each batch says how many passes it runs (0: none at all)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, tokens, passes):
        m = self.inner
        x = m.embed(tokens) + m.pos[: tokens.shape[1]]
        for _ in range(passes):
            x = m.core(x)
        return m.head(x)


def _halting_loss(model, batch):
    logits = model(batch["tokens"], batch["passes"])[:, :-1]
    per_token = F.cross_entropy(
        logits.flatten(0, 1), batch["tokens"][:, 1:].flatten(), reduction="none"
    )
    return per_token.view(batch["tokens"].shape[0], -1).mean(dim=1)


def test_a_batch_whose_loop_halts_before_its_first_step_gets_zero_rows(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", model)
    steps = model.loop_steps
    halting = _Halting(model)
    train = [{**b, "passes": 0 if i == 1 else steps} for i, b in enumerate(train_batches)]
    query = [{**b, "passes": steps} for b in query_batches]
    est = ProjectedTracInSDI(model=halting, target_modules=model.core, projection_size=32)
    load = {"load_model_state_dict_fn": lambda m, c: None}
    with pytest.warns(RuntimeWarning, match="halted before its first step.*zero"):
        got = _run(est, [CheckpointSpec(path, 1.0)], train, query, _halting_loss, **load)
    want = _run(_est(model), [CheckpointSpec(path, 1.0)], train_batches, query_batches)
    assert (got.sdi[3:6] == 0).all()  # the halted batch's rows: exactly zero
    keep = [0, 1, 2, 6]
    torch.testing.assert_close(got.sdi[keep], want.sdi[keep], rtol=1e-4, atol=1e-6)
    # Per step too (query side halted, with expected_steps fixing the step count).
    query[0] = {**query[0], "passes": 0}
    est = ProjectedTracInSDI(
        model=halting, target_modules=model.core, projection_size=32, expected_steps=steps
    )
    with pytest.warns(RuntimeWarning, match="halted"):
        phi = est.featurize_loader(loader=query, loss_fn=_halting_loss)
    assert all((v == 0).all() and v.shape[1] == steps for v in phi.phi.values())


def test_root_parameters_of_a_looped_model_are_attributed_where_they_are_used(
    tmp_path, model, train_batches, query_batches
):
    # The root's own parameter (the position table `pos`) is used by an operation in the root's
    # forward, before the loop: captured at that operation, it lands in the prelude step, so the
    # whole model can be selected (it used to be refused, naming a selection that works).
    path = save_checkpoint(tmp_path / "a.pt", model)
    est = ProjectedTracInSDI(
        model=model, target_modules=model, projection_size=16, allow_mixed_steps=True
    )
    whole = _run(est, [CheckpointSpec(path, 1.0)], train_batches, query_batches)
    assert "<model>" in str(est.step_plan)  # the root's own use of `pos`, in the prelude
    assert whole.sdi.shape == (7, 4, model.loop_steps + 2)
    torch.testing.assert_close(whole.sdi.sum(-1), whole.tracin, rtol=1e-4, atol=1e-5)
    est.close()
    est = ProjectedTracInSDI(
        model=model,
        target_modules=[model.embed, model.core, model.head],
        projection_size=16,
        allow_mixed_steps=True,
    )
    out = _run(est, [CheckpointSpec(path, 1.0)], train_batches, query_batches)
    assert out.sdi.shape == (7, 4, model.loop_steps + 2)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.body = nn.Linear(3, 1)

    def forward(self, x):
        return {"y": self.body(x * self.scale).squeeze(-1)}


def test_root_parameter_of_a_model_returning_a_dict_is_attributed_at_its_operation():
    # `scale` is used by `x * self.scale` in the root's forward: captured at that operation, its
    # per-example gradient is exact although the root returns a dict (it used to be refused).
    torch.manual_seed(0)
    model, x = _DictOut(), torch.randn(4, 3)
    est = FullGradientTracInSDI(model=model, target_modules=model)
    phi = est.featurize_loader(loader=[x], loss_fn=lambda m, b: m(b)["y"]).phi
    want = torch.stack(
        [torch.autograd.grad(model(x[i : i + 1])["y"].sum(), model.scale)[0] for i in range(4)]
    )
    torch.testing.assert_close(phi["scale"].sum(1).reshape(4), want.reshape(4))


# -- item 6: sizes checked before the work ------------------------------------------------------


def test_projection_size_2_31_is_refused_up_front_naming_the_bytes_and_the_knob(model, monkeypatch):
    monkeypatch.setattr("sdi.sizes.device_memory_bytes", lambda device: 32 << 30)
    params = len(list(model.core.parameters()))
    with pytest.raises(ValueError) as err:
        ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=2**31)
    message = str(err.value)
    want = params * 2**31 * 4 / 2**30  # one example, one step: 8 parameters x 2**31 x 4 bytes
    assert f"would take {want:,.1f} GiB" in message and "32.0 GiB" in message
    assert f"{params} parameters x projection_size 2147483648 x 4 bytes" in message
    assert "lower projection_size" in message


def test_a_batch_too_large_is_refused_before_its_backward(model, query_batches, monkeypatch):
    est = _est(model)  # 8 parameters x 32 columns: 1 KiB per example and step
    monkeypatch.setattr("sdi.sizes.device_memory_bytes", lambda device: 6 << 10)
    backward = []
    model.core.register_full_backward_hook(lambda *a: backward.append(1))
    with pytest.raises(ValueError, match=r"one batch would take .*4 examples x 3 steps") as err:
        est.featurize_loader(loader=query_batches, loss_fn=next_token_loss)
    assert "smaller batches" in str(err.value) and "projection_size" in str(err.value)
    assert not backward


def test_exact_estimator_too_large_names_the_projected_one(model, monkeypatch):
    monkeypatch.setattr("sdi.sizes.device_memory_bytes", lambda device: 1 << 10)
    numel = sum(p.numel() for p in model.core.parameters())
    with pytest.raises(ValueError, match=rf"{numel} parameter entries.*use ProjectedTracInSDI"):
        FullGradientTracInSDI(model=model, target_modules=model.core)


def test_device_memory_is_known_on_the_cpu():
    from sdi.sizes import device_memory_bytes

    assert device_memory_bytes(torch.device("cpu")) > 2**28


# -- item 7: explain on sequence-first models ---------------------------------------------------


class _MLPLoop(nn.Module):
    """The toy model's embedding, MLP loop and head, run sequence-first ``(T, B, d)`` inside when
    ``seq_first``; its loader yields batch-first token ids ``(B, T)`` either way."""

    def __init__(self, inner, seq_first: bool):
        super().__init__()
        self.inner, self.seq_first = inner, seq_first

    def forward(self, tokens):
        m = self.inner
        x = m.embed(tokens) + m.pos[: tokens.shape[1]]
        x = x.transpose(0, 1).contiguous() if self.seq_first else x
        for _ in range(m.loop_steps):
            x = x + m.core.fc2(F.gelu(m.core.fc1(x)))
        return m.head(x.transpose(0, 1) if self.seq_first else x)


def test_explain_on_a_sequence_first_model_with_batch_first_loaders(tmp_path, model):
    path = save_checkpoint(tmp_path / "a.pt", model)
    train = random_token_batches(5, 2, SEQ, VOCAB, seed=3)  # B=2 != T=7: the count matters
    query = random_token_batches(3, 3, SEQ, VOCAB, seed=4)
    pairs = [(0, 0), (3, 2), (4, 1)]
    common = dict(
        checkpoints=[CheckpointSpec(path, 1.0)],
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
        load_model_state_dict_fn=lambda m, c: None,
    )
    results = {}
    for seq_first in (True, False):
        wrapped = _MLPLoop(model, seq_first)
        est = ProjectedTracInSDI(
            model=wrapped,
            target_modules=[model.core.fc1, model.core.fc2],
            projection_size=32,
            batch_first=not seq_first,
        )
        dense = est.influence_across_checkpoints(**common)  # accepts these loaders
        got = est.explain(pairs=pairs, **common)
        top = est.top_influences(k=2, explain=True, **common)
        est.close()
        for (i, j), e in zip(pairs, got, strict=True):
            torch.testing.assert_close(e.sdi, dense.sdi[i, j], rtol=1e-4, atol=1e-6)
            assert e.positions_train.shape == (SEQ, model.loop_steps)
        first = top.most_explanations[0][0]
        torch.testing.assert_close(
            first.sdi, dense.sdi[top.most_indices[0, 0], 0], rtol=1e-4, atol=1e-6
        )
        results[seq_first] = got
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a.positions_train, b.positions_train, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.positions_query, b.positions_query, rtol=1e-4, atol=1e-6)


def test_explain_says_how_to_lay_out_a_batch_it_cannot_count(tmp_path, model):
    path = save_checkpoint(tmp_path / "a.pt", model)
    odd = [
        {"ids": torch.zeros(5), "tokens": b["tokens"]}
        for b in random_token_batches(4, 2, SEQ, VOCAB, 1)
    ]
    est = _est(model)
    with pytest.raises(ValueError, match=r"shape \(5,\), but the model saw a batch of 2.*first"):
        est.explain(
            pairs=[(0, 0)],
            checkpoints=[CheckpointSpec(path, 1.0)],
            train_loader=odd,
            query_loader=odd,
            loss_fn=next_token_loss,
        )


# -- the same class elsewhere: each refusal says what, and how to fix it -----------------------


def _frozen_core(model):
    model.core.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "loss_fn, fix",
    [
        (lambda m, b: next_token_loss(m, b).tolist(), "return the per-example losses"),
        (
            lambda m, b: m(b["tokens"]).logsumexp(-1),  # (B, T) per-token values
            r"per-token losses \(B, T\): .mean\(dim=1\)",
        ),
        (lambda m, b: next_token_loss(m, b).detach(), "from this call of the model"),
    ],
    ids=["not-a-tensor", "per-token", "detached"],
)
def test_loss_refusals_name_the_fix(model, train_batches, loss_fn, fix):
    with pytest.raises((TypeError, ValueError, RuntimeError), match=fix):
        _est(model).featurize_loader(loader=train_batches, loss_fn=loss_fn)


def test_selection_without_trainable_parameters_names_the_fix(model, query_batches):
    # A selection owning no trainable parameter is legal until a forward shows that no operation
    # inside its calls computed with one either (parameters may be passed in: banks).
    est = _est(_frozen_core(model))
    with pytest.raises(ValueError, match="requires_grad=True"):
        est.featurize_loader(loader=query_batches, loss_fn=next_token_loss)


def test_query_batches_with_other_step_counts_name_tracin(tmp_path, model, query_batches):
    path = save_checkpoint(tmp_path / "a.pt", model)
    query = [{**query_batches[0], "passes": 3}, {**query_batches[0], "passes": 2}]
    est = ProjectedTracInSDI(model=_Halting(model), target_modules=model.core, projection_size=8)
    with pytest.raises(ValueError, match=r"different step counts \[2, 3\].*mode='tracin'"):
        _run(
            est,
            [CheckpointSpec(path, 1.0)],
            query,
            query,
            _halting_loss,
            load_model_state_dict_fn=lambda m, c: None,
        )
    out = _run(
        est,
        [CheckpointSpec(path, 1.0)],
        query,
        query,
        _halting_loss,
        mode="tracin",
        load_model_state_dict_fn=lambda m, c: None,
    )
    assert out.tracin.shape == (8, 8)  # the fix it names works


def test_standard_errors_of_the_exact_estimator_name_the_projected_one(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "a.pt", model)
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    with pytest.raises(ValueError, match="use ProjectedTracInSDI"):
        _run(
            est,
            [CheckpointSpec(path, 1.0)],
            train_batches,
            query_batches,
            with_standard_errors=True,
        )


def test_a_selected_module_the_model_never_calls_is_named(model, train_batches):
    model.extra = nn.Linear(12, 12)  # registered, never called by forward
    est = ProjectedTracInSDI(
        model=model, target_modules=[model.core, model.extra], projection_size=8
    )
    with pytest.raises(RuntimeError) as err:
        est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    message = str(err.value)
    assert "['extra.weight', 'extra.bias'] were never used in this batch's forward pass" in message
    assert "leave it out of target_modules" in message and "no_grad" not in message


def test_unreadable_checkpoints_are_named_by_index(tmp_path, model, train_batches, query_batches):
    good = save_checkpoint(tmp_path / "good.pt", model)
    (tmp_path / "empty.pt").write_bytes(b"")
    for bad, error in ((tmp_path / "empty.pt", ValueError), (tmp_path / "gone.pt", OSError)):
        with pytest.raises(error, match=rf"^checkpoints\[1\]: {re.escape(str(bad))}"):
            _run(_est(model), [good, bad], train_batches, query_batches)
