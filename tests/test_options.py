"""RunOptions: one frozen object that checks the options of a call once."""

from __future__ import annotations

import dataclasses

import pytest

from sdi.checkpoints import (
    CheckpointSpec,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from sdi.options import RunOptions


def _options(**kw) -> RunOptions:
    given = dict(
        checkpoints=[CheckpointSpec("a.pt", 1.0)],
        train_loader=[],
        query_loader=[],
        loss_fn=lambda model, batch: None,
        load_checkpoint_fn=default_load_checkpoint,
        load_model_state_dict_fn=default_load_model_state_dict,
        eta_from_checkpoint_fn=default_eta_from_checkpoint,
    )
    return RunOptions(**{**given, **kw})


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(mode="exact"), "mode must be 'sdi' or 'tracin', got 'exact'"),
        (dict(mode="tracin", with_step_matrix=True), "with_step_matrix=True needs mode='sdi'"),
        (dict(checkpoints=[]), "no checkpoints given: pass at least one CheckpointSpec or path"),
        (dict(max_query_bytes=0), "max_query_bytes must be positive, got 0"),
        (dict(max_query_bytes=-5), "max_query_bytes must be positive, got -5"),
    ],
)
def test_bad_options_are_refused_on_construction(bad, message):
    with pytest.raises(ValueError) as err:
        _options(**bad)
    assert str(err.value) == message


def test_options_are_frozen_and_hold_the_checkpoints_as_a_tuple():
    specs = [CheckpointSpec("a.pt", 0.5), CheckpointSpec("b.pt")]
    options = _options(checkpoints=iter(specs))  # an iterator serves every pass of a call
    assert options.checkpoints == tuple(specs)
    assert options.checkpoints == tuple(specs)  # not consumed by the first look
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.mode = "tracin"


def test_replace_checks_again_and_chunks_pair_the_sizes():
    options = _options(train_chunk_size=3, query_chunk_size=None)
    assert options.chunks == (3, None)
    assert dataclasses.replace(options, mode="tracin").mode == "tracin"
    with pytest.raises(ValueError, match="with_step_matrix"):
        dataclasses.replace(options, with_step_matrix=True, mode="tracin")


@pytest.mark.parametrize("name", ["train_loader", "query_loader"])
def test_one_shot_loaders_are_refused_on_construction(name):
    with pytest.raises(TypeError, match=f"{name} is an iterator, which can be iterated only once"):
        _options(**{name: (batch for batch in [1, 2])})


@pytest.mark.parametrize("name", ["max_query_bytes", "train_chunk_size", "query_chunk_size"])
def test_non_integer_sizes_are_refused(name):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got 2.5"):
        _options(**{name: 2.5})
    if name != "max_query_bytes":  # a chunk size <= 0 takes the whole dimension
        assert getattr(_options(**{name: 0}), name) == 0
