"""Checkpoint loading: safetensors files, Trainer folders (single, sharded, .bin), eta sources,
tied weights, corrupt files told apart from pickled ones, validated weights and paths."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import ESTIMATORS, run_influence, save_checkpoint, tiny_model
from safetensors.torch import save_file

from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.checkpoints import (
    CorruptCheckpointError,
    PickledCheckpointError,
    as_checkpoint_specs,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
    eta_and_source,
)
from sdi.toy import next_token_loss

OPT_IN = "weights_only=False"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _trainer_state(folder: Path, global_step: int, logged: dict[int, object]) -> None:
    """A trainer_state.json as transformers.Trainer writes it: lr logged at some steps, and an
    eval entry (no learning_rate) at the global step."""
    history = [
        {"epoch": s / 10, "learning_rate": lr, "loss": 1.0, "step": s} for s, lr in logged.items()
    ]
    history.append({"epoch": global_step / 10, "eval_loss": 0.9, "step": global_step})
    state = {"global_step": global_step, "max_steps": 100, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def _optimizer_file(folder: Path, lr) -> None:
    torch.save(
        {"state": {}, "param_groups": [{"lr": lr, "betas": (0.9, 0.999)}]}, folder / "optimizer.pt"
    )


def _tracin(checkpoints, model, train_batches, query_batches, **kwargs):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=64)
    try:
        return est.influence_across_checkpoints(
            checkpoints=checkpoints,
            train_loader=train_batches,
            query_loader=query_batches,
            loss_fn=next_token_loss,
            mode="tracin",
            **kwargs,
        ).tracin
    finally:
        est.close()


@pytest.fixture
def trained():
    """A model whose weights differ from the estimator's model, so loading is visible."""
    return tiny_model(seed=5)


def _assert_loads_as(checkpoint, want: torch.nn.Module) -> None:
    model = tiny_model(seed=0)
    default_load_model_state_dict(model, checkpoint)
    for (name, got), expected in zip(
        model.state_dict().items(), want.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_bare_safetensors_file_loads_like_the_torch_file(
    tmp_path, trained, train_batches, query_batches
):
    save_file(_state(trained), tmp_path / "w.safetensors")
    _assert_loads_as(default_load_checkpoint(tmp_path / "w.safetensors"), trained)
    save_file(_state(trained), tmp_path / "w.weights")  # recognised by its header, not its name
    _assert_loads_as(default_load_checkpoint(tmp_path / "w.weights"), trained)
    pt = save_checkpoint(tmp_path / "w.pt", trained)
    model = tiny_model(seed=0)
    want = _tracin([CheckpointSpec(pt)], model, train_batches, query_batches)
    got = _tracin([CheckpointSpec(tmp_path / "w.safetensors")], model, train_batches, query_batches)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_trainer_folder_layouts(tmp_path, trained, layout):
    folder = tmp_path / "checkpoint-30"
    folder.mkdir()
    state = _state(trained)
    if layout == "safetensors":
        save_file(state, folder / "model.safetensors")
    elif layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        keys = list(state)
        halves = {"a": keys[::2], "b": keys[1::2]}
        weight_map = {}
        for part, names in halves.items():
            if layout == "sharded-safetensors":
                shard = f"model-0000{'ab'.index(part) + 1}-of-00002.safetensors"
                save_file({k: state[k] for k in names}, folder / shard)
                index = "model.safetensors.index.json"
            else:
                shard = f"pytorch_model-0000{'ab'.index(part) + 1}-of-00002.bin"
                torch.save({k: state[k] for k in names}, folder / shard)
                index = "pytorch_model.bin.index.json"
            weight_map.update(dict.fromkeys(names, shard))
        (folder / index).write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
        )
    checkpoint = default_load_checkpoint(folder)
    assert set(checkpoint) == {"model_state_dict"}
    _assert_loads_as(checkpoint, trained)


def test_sharded_index_names_a_missing_or_short_shard(tmp_path, trained):
    state = _state(trained)
    keys = list(state)
    save_file({k: state[k] for k in keys[:3]}, tmp_path / "one.safetensors")
    index = {
        "weight_map": {
            **dict.fromkeys(keys[:3], "one.safetensors"),
            **dict.fromkeys(keys[3:], "two.safetensors"),
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="two.safetensors is missing"):
        default_load_checkpoint(tmp_path)
    save_file({k: state[k] for k in keys[3:-1]}, tmp_path / "two.safetensors")  # one tensor short
    with pytest.raises(CorruptCheckpointError, match="two.safetensors: lacks 1 tensor"):
        default_load_checkpoint(tmp_path)


def test_folder_without_weights_says_what_it_holds(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError, match=r"none of model\.safetensors.*checkpoint-\* folders"
    ):
        default_load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("global_step", "want_lr", "want_step"),
    [(20, 2e-3, 20), (27, 2e-3, 20), (30, 3e-3, 30), (100, 4e-3, 40)],
)
def test_eta_from_trainer_state_at_or_before_the_global_step(
    tmp_path, trained, global_step, want_lr, want_step
):
    save_file(_state(trained), tmp_path / "model.safetensors")
    _trainer_state(tmp_path, global_step, {10: 1e-3, 20: 2e-3, 30: 3e-3, 40: 4e-3})
    _optimizer_file(tmp_path, 0.5)  # a lower-priority source with another value
    eta, source = eta_and_source(default_load_checkpoint(tmp_path))
    assert eta == want_lr
    assert source == f"trainer_state.json (learning_rate logged at step {want_step})"


def test_eta_falls_back_to_optimizer_file_then_one(tmp_path, trained):
    save_file(_state(trained), tmp_path / "model.safetensors")
    _trainer_state(tmp_path, 5, {10: 1e-3})  # nothing logged at or before step 5
    _optimizer_file(tmp_path, 0.25)
    assert eta_and_source(default_load_checkpoint(tmp_path)) == (0.25, "optimizer.pt")
    (tmp_path / "optimizer.pt").unlink()
    assert eta_and_source(default_load_checkpoint(tmp_path)) == (1.0, "fallback")
    assert default_eta_from_checkpoint(default_load_checkpoint(tmp_path), fallback=0.5) == 0.5


def test_eta_from_optimizer_state_dict_of_a_torch_file(tmp_path, trained):
    path = save_checkpoint(tmp_path / "a.pt", trained, lr=0.3)
    assert eta_and_source(default_load_checkpoint(path)) == (0.3, "optimizer_state_dict")
    tensor_lr = tmp_path / "t.pt"
    torch.save(
        {
            "model_state_dict": _state(trained),
            "optimizer_state_dict": {"param_groups": [{"lr": torch.tensor(0.125)}]},
        },
        tensor_lr,
    )
    assert default_eta_from_checkpoint(default_load_checkpoint(tensor_lr)) == 0.125


def test_folder_weight_from_trainer_state_scales_tracin(
    tmp_path, trained, train_batches, query_batches
):
    folder = tmp_path / "checkpoint-20"
    folder.mkdir()
    save_file(_state(trained), folder / "model.safetensors")
    _trainer_state(folder, 20, {10: 0.1, 20: 0.375})
    model = tiny_model(seed=0)
    unit = _tracin([CheckpointSpec(folder, weight=1.0)], model, train_batches, query_batches)
    got = _tracin([folder], model, train_batches, query_batches)  # a bare path: eta from the folder
    torch.testing.assert_close(got, 0.375 * unit, rtol=1e-6, atol=1e-7)
    # A user's one-argument eta function sees a plain checkpoint dict with the weights.
    seen = []
    custom = _tracin(
        [folder],
        model,
        train_batches,
        query_batches,
        eta_from_checkpoint_fn=lambda c: seen.append(sorted(c)) or 2.0,
    )
    assert seen == [["model_state_dict"]]
    torch.testing.assert_close(custom, 2.0 * unit, rtol=1e-6, atol=1e-7)


def test_albert_save_pretrained_folder_restores_tied_weights(tmp_path):
    import transformers

    config = transformers.AlbertConfig(
        vocab_size=40,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=12,
    )
    torch.manual_seed(1)
    saved = transformers.AlbertForMaskedLM(config)
    saved.save_pretrained(tmp_path / "checkpoint-1")
    on_disk = default_load_checkpoint(tmp_path / "checkpoint-1")["model_state_dict"]
    left_out = set(saved.state_dict()) - set(on_disk)
    assert "predictions.decoder.weight" in left_out  # tied to the word embeddings, not saved
    torch.manual_seed(2)
    fresh = transformers.AlbertForMaskedLM(config)
    default_load_model_state_dict(fresh, default_load_checkpoint(tmp_path / "checkpoint-1"))
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert fresh.predictions.decoder.weight is fresh.albert.embeddings.word_embeddings.weight


def test_untied_missing_key_still_fails_strict_loading(tmp_path, trained):
    state = _state(trained)
    dropped = next(iter(state))
    del state[dropped]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(RuntimeError, match=f"keys are not in the checkpoint: \\['{dropped}'\\]"):
        default_load_model_state_dict(
            tiny_model(), default_load_checkpoint(tmp_path / "w.safetensors")
        )


def test_bare_state_dict_keeps_its_keys_and_metadata(tmp_path, trained):
    torch.save(trained.state_dict(), tmp_path / "sd.pt")
    checkpoint = default_load_checkpoint(tmp_path / "sd.pt")
    assert set(checkpoint) == set(trained.state_dict())
    assert checkpoint._metadata == trained.state_dict()._metadata
    _assert_loads_as(checkpoint, trained)


# -- bad weights and learning rates ----------------------------------------------------------


@pytest.mark.parametrize(
    "weight", [math.nan, math.inf, -math.inf, "abc", "0.5", True, None.__class__]
)
def test_spec_weight_must_be_a_finite_number(weight):
    with pytest.raises(
        ValueError, match=r"CheckpointSpec\('ck.pt'\)\.weight must be a finite real number"
    ):
        CheckpointSpec("ck.pt", weight=weight)


def test_spec_weight_accepts_numbers():
    assert CheckpointSpec("a", weight=2).weight == 2
    assert CheckpointSpec("a", weight=torch.tensor(0.5)).path == "a"


@pytest.mark.parametrize("lr", [math.nan, math.inf, "abc", [0.1]])
def test_stored_lr_must_be_a_finite_number(tmp_path, trained, train_batches, query_batches, lr):
    path = tmp_path / "bad-lr.pt"
    torch.save(
        {
            "model_state_dict": _state(trained),
            "optimizer_state_dict": {"param_groups": [{"lr": lr}]},
        },
        path,
    )
    with pytest.raises(
        ValueError, match=r"learning rate stored in .*bad-lr\.pt.* must be a finite real number"
    ):
        _tracin([path], tiny_model(), train_batches, query_batches)
    _tracin(
        [CheckpointSpec(path, weight=1.0)], tiny_model(), train_batches, query_batches
    )  # unused


@pytest.mark.parametrize("eta", [math.nan, -math.inf, "abc"])
def test_a_custom_eta_function_must_give_a_finite_number(
    tmp_path, train_batches, query_batches, eta
):
    path = save_checkpoint(tmp_path / "custom-eta.pt", tiny_model())
    model = tiny_model()
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=8)
    with pytest.raises(ValueError, match=r"weight \(eta\) of checkpoint .*custom-eta\.pt.* finite"):
        run_influence(est, path, train_batches, query_batches, eta_from_checkpoint_fn=lambda c: eta)


@pytest.mark.parametrize("lr", [math.nan, "abc"])
def test_trainer_state_lr_must_be_a_finite_number(tmp_path, trained, lr):
    save_file(_state(trained), tmp_path / "model.safetensors")
    _trainer_state(tmp_path, 10, {10: lr})
    (tmp_path / "trainer_state.json").write_text(
        (tmp_path / "trainer_state.json").read_text().replace('"nan"', "NaN")
    )
    with pytest.raises(
        ValueError, match=r"learning_rate logged at step 10 in .*trainer_state\.json"
    ):
        default_eta_from_checkpoint(default_load_checkpoint(tmp_path))


def test_optimizer_file_lr_must_be_finite(tmp_path, trained):
    save_file(_state(trained), tmp_path / "model.safetensors")
    _optimizer_file(tmp_path, math.inf)
    with pytest.raises(ValueError, match=r"optimizer\.pt must be a finite real number"):
        default_eta_from_checkpoint(default_load_checkpoint(tmp_path))


def test_broken_trainer_state_is_named(tmp_path, trained):
    save_file(_state(trained), tmp_path / "model.safetensors")
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    with pytest.raises(
        CorruptCheckpointError, match="trainer_state.json: not a valid trainer state"
    ):
        default_eta_from_checkpoint(default_load_checkpoint(tmp_path))


# -- corrupt files vs pickled objects ---------------------------------------------------------


def _corrupt_files(folder: Path, trained) -> dict[str, tuple[Path, str]]:
    good = folder / "good.pt"
    torch.save({"model_state_dict": _state(trained)}, good)
    data = good.read_bytes()
    files = {
        "random bytes": (
            random.Random(0).randbytes(4096),
            "neither a torch.save file nor safetensors",
        ),
        "truncated zip": (data[: len(data) // 2], "truncated or corrupt torch.save archive"),
        "text": (b"step,loss\n1,0.5\n", "it holds text"),
        "empty": (b"", "the file is empty"),
        "garbage after pickle opcode": (
            b"\x80\x02" + random.Random(1).randbytes(64),
            "its pickle is damaged",
        ),
    }
    out = {}
    for i, (kind, (content, message)) in enumerate(files.items()):
        path = folder / f"bad{i}.pt"
        path.write_bytes(content)
        out[kind] = (path, message)
    safetensors = folder / "w.safetensors"
    save_file(_state(trained), safetensors)
    safetensors.write_bytes(safetensors.read_bytes()[:-50])
    out["truncated safetensors"] = (safetensors, "corrupt or truncated safetensors file")
    return out


def test_corrupt_files_are_not_called_pickled(tmp_path, trained):
    for kind, (path, message) in _corrupt_files(tmp_path, trained).items():
        with pytest.raises(CorruptCheckpointError) as info:
            default_load_checkpoint(path)
        text = str(info.value)
        assert message in text, (kind, text)
        assert str(path) in text, kind
        assert (
            OPT_IN not in text
            and "load_checkpoint_fn" not in text
            and "pickled Python objects" not in text
        ), kind


def test_corrupt_weights_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    )
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: corrupt or truncated"):
        default_load_checkpoint(tmp_path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_really_pickled_checkpoint_names_the_objects_and_the_opt_in(tmp_path, trained, zip_format):
    path = tmp_path / "pickled.pt"
    torch.save(
        {"model_state_dict": _state(trained), "args": argparse.Namespace(lr=1)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(
        PickledCheckpointError, match=r"pickled Python objects \(argparse\.Namespace\)"
    ) as info:
        default_load_checkpoint(path)
    assert OPT_IN in str(info.value) and "load_checkpoint_fn" in str(info.value)
    assert isinstance(info.value, RuntimeError)  # what earlier versions raised


def test_legacy_torch_file_without_objects_loads(tmp_path, trained):
    torch.save(
        {"model_state_dict": _state(trained)},
        tmp_path / "old.pt",
        _use_new_zipfile_serialization=False,
    )
    _assert_loads_as(default_load_checkpoint(tmp_path / "old.pt"), trained)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: no such checkpoint"):
        default_load_checkpoint(tmp_path / "nope.pt")


# -- the checkpoints argument -----------------------------------------------------------------


def test_paths_become_specs(tmp_path):
    specs = as_checkpoint_specs(["a.pt", tmp_path / "b", CheckpointSpec("c", weight=0.5)])
    assert specs == [
        CheckpointSpec("a.pt"),
        CheckpointSpec(tmp_path / "b"),
        CheckpointSpec("c", weight=0.5),
    ]
    assert as_checkpoint_specs(iter(["a.pt"])) == [CheckpointSpec("a.pt")]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("a.pt", TypeError, r"a single str: pass checkpoints=\['a.pt'\]"),
        (Path("a.pt"), TypeError, "a single PosixPath"),
        (CheckpointSpec("a.pt"), TypeError, "a single CheckpointSpec"),
        (["a.pt", 3], TypeError, r"checkpoints\[1\] must be a CheckpointSpec or a path .* int: 3"),
        ({"a.pt": 1.0}, TypeError, "got dict"),
        (None, TypeError, "got NoneType"),
        ([], ValueError, "no checkpoints given"),
    ],
)
def test_bad_checkpoints_argument(value, error, message):
    with pytest.raises(error, match=message):
        as_checkpoint_specs(value)


def test_estimator_takes_string_paths(tmp_path, trained, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "a.pt", trained, lr=0.5)
    model = tiny_model()
    want = _tracin([CheckpointSpec(path)], model, train_batches, query_batches)
    torch.testing.assert_close(
        _tracin([path], model, train_batches, query_batches), want, rtol=0, atol=0
    )
    torch.testing.assert_close(
        _tracin([Path(path)], model, train_batches, query_batches), want, rtol=0, atol=0
    )
    with pytest.raises(TypeError, match="single str"):
        _tracin(path, model, train_batches, query_batches)


def test_zip_without_torch_pickle_is_not_a_checkpoint(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.pt", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CorruptCheckpointError, match="a zip archive without data.pkl"):
        default_load_checkpoint(tmp_path / "a.pt")


class _TiedLM(torch.nn.Module):
    """An embedding and an output head sharing one weight, as HF causal LMs tie lm_head."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 5)
        self.head = torch.nn.Linear(5, 11, bias=False)
        self.head.weight = self.embed.weight


def test_any_tied_weight_left_out_is_restored(tmp_path):
    torch.manual_seed(0)
    saved = _TiedLM()
    save_file({"embed.weight": saved.embed.weight.detach().clone()}, tmp_path / "m.safetensors")
    fresh = _TiedLM()
    default_load_model_state_dict(fresh, default_load_checkpoint(tmp_path / "m.safetensors"))
    torch.testing.assert_close(fresh.head.weight, saved.embed.weight, rtol=0, atol=0)
    assert fresh.head.weight is fresh.embed.weight


def test_trainer_state_entries_without_a_numeric_step_are_ignored(tmp_path, trained):
    save_file(_state(trained), tmp_path / "model.safetensors")
    history = [
        {"learning_rate": 0.5, "step": 4},
        {"learning_rate": 9.0, "step": "6"},  # not a step number: skipped, not compared
        {"learning_rate": 9.0},
    ]
    state = {"global_step": 8, "log_history": history}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    got = eta_and_source(default_load_checkpoint(tmp_path))
    assert got == (0.5, "trainer_state.json (learning_rate logged at step 4)")


@pytest.mark.parametrize("make", ESTIMATORS)
def test_checkpoint_weights_sum_linearly(tmp_path, make, train_batches, query_batches):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    pa, pb = save_checkpoint(tmp_path / "a.pt", a, lr=0.3), save_checkpoint(tmp_path / "b.pt", b)
    est = make(model=a, target_modules=a.core)
    one = run_influence(est, [CheckpointSpec(pa, weight=1.0)], train_batches, query_batches).sdi
    two = run_influence(est, [CheckpointSpec(pb, weight=1.0)], train_batches, query_batches).sdi
    both = run_influence(
        est, [CheckpointSpec(pa), CheckpointSpec(pb, weight=0.7)], train_batches, query_batches
    )
    torch.testing.assert_close(both.sdi, 0.3 * one + 0.7 * two, rtol=1e-4, atol=1e-6)  # 0.3: the lr


def test_checkpoint_formats(tmp_path, model, train_batches, query_batches):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=32)
    want = run_influence(
        est, save_checkpoint(tmp_path / "a.pt", model), train_batches, query_batches
    ).tracin
    for i, ckpt in enumerate([{"state_dict": model.state_dict()}, model.state_dict()]):
        torch.save(ckpt, tmp_path / f"{i}.pt")
        torch.testing.assert_close(
            run_influence(est, str(tmp_path / f"{i}.pt"), train_batches, query_batches).tracin, want
        )


def test_pickled_checkpoint_needs_opt_in(tmp_path, model, train_batches, query_batches):
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=32)
    with pytest.raises(RuntimeError, match="load_checkpoint_fn"):
        run_influence(est, str(path), train_batches, query_batches)
    out = run_influence(
        est,
        str(path),
        train_batches,
        query_batches,
        load_checkpoint_fn=lambda p: torch.load(p, weights_only=False),
    )
    assert out.tracin.shape == (7, 4)
