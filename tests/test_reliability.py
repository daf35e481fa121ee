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
from sdi.toy import next_token_loss, random_token_batches


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


class _Compiled(nn.Module):
    """Keys as a ``torch.compile``d model's ``state_dict()`` has them (``_orig_mod.`` first)."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


@pytest.mark.parametrize(
    "saved, said",
    [
        (lambda m: _Compiled(m).state_dict(), "removed the prefix '_orig_mod.'"),
        (lambda m: {"model": m.state_dict(), "epoch": 3}, "under the key 'model'"),
        (lambda m: {"module": m.state_dict(), "step": 10}, "under the key 'module'"),
        (
            lambda m: {"model": _Compiled(m).state_dict(), "epoch": 3},
            "under the key 'model' (ignoring ['epoch']) and removed the prefix '_orig_mod.'",
        ),
    ],
    ids=["orig_mod", "model-wrapper", "module-wrapper", "both"],
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
    wider = torch.nn.Module()
    from sdi.toy import LoopedTransformer

    wider = LoopedTransformer(vocab=VOCAB, d_model=16, n_heads=2, loop_steps=3, max_len=SEQ)
    message = _mismatch_error(tmp_path, wider.state_dict(), train_batches, query_batches)
    assert "shapes differ" in message
    assert "embed.weight: checkpoint (19, 16), model (19, 12)" in message


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
    for path in (copy, renamed):
        calls = []
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
