"""The estimators' public contract: method signatures (drop-in with 0.1.1 plus today's keywords),
bad arguments and empty inputs named in the error."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch.nn as nn
from conftest import run_influence, save_checkpoint

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.checkpoints import (
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from sdi.toy import next_token_loss

NO_DEFAULT = inspect.Parameter.empty

# (name, default) of every keyword-only parameter, in order. Written out by hand: a restructuring
# that drops, renames, reorders or re-defaults one fails here.
LOADING = [
    ("load_checkpoint_fn", default_load_checkpoint),
    ("load_model_state_dict_fn", default_load_model_state_dict),
    ("eta_from_checkpoint_fn", default_eta_from_checkpoint),
    ("progress", False),
    ("progress_desc", "checkpoints"),
    ("max_query_bytes", 2 << 30),
    ("train_store", None),
    ("gather_to", 0),
]
RUN = [
    ("checkpoints", NO_DEFAULT),
    ("train_loader", NO_DEFAULT),
    ("query_loader", NO_DEFAULT),
    ("loss_fn", NO_DEFAULT),
]
SHARED_INIT = [
    ("loss_reduction", "sum"),
    ("batch_first", True),
    ("expected_steps", None),
    ("allow_mixed_steps", False),
    ("strict", True),
]
CONTRACT = {
    "influence_across_checkpoints": RUN
    + [
        ("mode", "sdi"),
        ("with_step_matrix", False),
        ("train_chunk_size", None),
        ("query_chunk_size", None),
    ]
    + LOADING
    + [("with_standard_errors", False), ("by_parameter", False)],
    "top_influences": [("k", NO_DEFAULT)] + RUN + LOADING + [("explain", False)],
    "featurize_loader": [("loader", NO_DEFAULT), ("loss_fn", NO_DEFAULT), ("gather_to", "all")],
    "explain": [("pairs", NO_DEFAULT)] + RUN + [("by_parameter", True)] + LOADING[:5],
}
INIT = {
    ProjectedTracInSDI: [
        ("model", NO_DEFAULT),
        ("target_modules", NO_DEFAULT),
        ("projection_size", 2048),
        ("seed", 0),
    ]
    + SHARED_INIT,
    FullGradientTracInSDI: [("model", NO_DEFAULT), ("target_modules", NO_DEFAULT)] + SHARED_INIT,
}


def _keywords(function) -> list[tuple[str, object]]:
    params = list(inspect.signature(function).parameters.values())
    assert params[0].name == "self"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), function
    return [(p.name, p.default) for p in params[1:]]


@pytest.mark.parametrize("cls", [ProjectedTracInSDI, FullGradientTracInSDI])
@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_public_method_signatures_are_pinned(cls, method):
    assert _keywords(getattr(cls, method)) == CONTRACT[method]


@pytest.mark.parametrize("cls", sorted(INIT, key=lambda c: c.__name__))
def test_constructor_signatures_are_pinned(cls):
    assert _keywords(cls.__init__) == INIT[cls]


def test_close_and_model_are_public():
    assert list(inspect.signature(ProjectedTracInSDI.close).parameters) == ["self"]
    assert isinstance(inspect.getattr_static(ProjectedTracInSDI, "model"), property)


def _influence(est, path, train, query, **kw):
    checkpoints = kw.pop("checkpoints", [CheckpointSpec(path)])
    return est.influence_across_checkpoints(
        checkpoints=checkpoints,
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
        **kw,
    )


def _top(est, path, train, query, k=1):
    return est.top_influences(
        k=k,
        checkpoints=[CheckpointSpec(path)],
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda est, p, tr, q: _influence(est, p, [], q), "train_loader yielded no batches"),
        (lambda est, p, tr, q: _influence(est, p, tr, []), "query_loader yielded no batches"),
        (lambda est, p, tr, q: _top(est, p, [], q), "train_loader yielded no batches"),
        (
            lambda est, p, tr, q: est.featurize_loader(loader=[], loss_fn=next_token_loss),
            "loader yielded no batches",
        ),
        (lambda est, p, tr, q: _influence(est, p, tr, q, checkpoints=[]), "no checkpoints given"),
        (lambda est, p, tr, q: _influence(est, p, tr, q, max_query_bytes=0), "max_query_bytes"),
        (lambda est, p, tr, q: _top(est, p, tr, q, k=0), "k must be positive, got 0"),
        (
            lambda est, p, tr, q: _influence(est, p, tr, q, with_standard_errors=True),
            "with_standard_errors=True is for sketched estimates",
        ),
    ],
    ids=["train", "query", "top", "featurize", "checkpoints", "bytes", "k", "exact-se"],
)
def test_empty_inputs_and_bad_options_are_named(
    tmp_path, model, train_batches, query_batches, call, message
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    with pytest.raises(ValueError, match=message):
        call(est, path, train_batches, query_batches)


def test_bad_arguments(tmp_path, model, train_batches, query_batches):
    with pytest.raises(ValueError, match="loss_reduction"):
        ProjectedTracInSDI(model=model, target_modules=model.core, loss_reduction="avg")
    with pytest.raises(ValueError, match="projection_size"):
        ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ProjectedTracInSDI(model=model, target_modules=nn.ReLU())
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    with pytest.raises(ValueError, match="mode"):
        run_influence(est, path, train_batches, query_batches, mode="exact")
    with pytest.raises(ValueError, match="with_step_matrix"):
        run_influence(est, path, train_batches, query_batches, mode="tracin", with_step_matrix=True)
    with pytest.raises(ValueError, match="per-example losses"):
        est.featurize_loader(
            loader=train_batches, loss_fn=lambda m, b: next_token_loss(m, b)[:, None]
        )


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(projection_size=2.5), TypeError, "projection_size must be an integer, got 2.5"),
        (dict(projection_size=16.0), TypeError, "projection_size must be an integer, got 16.0"),
        (dict(projection_size=True), TypeError, "projection_size must be an integer, got True"),
        (dict(projection_size=-4), ValueError, "projection_size must be positive, got -4"),
        (dict(seed=2**70), ValueError, f"seed must be <= {2**64 - 1}, got {2**70}"),
        (dict(seed=-(2**64)), ValueError, "seed must be >= "),
        (dict(seed=1.5), TypeError, "seed must be an integer, got 1.5"),
        (dict(seed="7"), TypeError, "seed must be an integer, got '7'"),
    ],
)
def test_non_integer_or_out_of_range_sketch_arguments_are_refused(model, bad, error, message):
    with pytest.raises(error) as err:
        ProjectedTracInSDI(model=model, target_modules=model.core, **bad)
    assert str(err.value).startswith(message)


def test_numpy_integers_are_accepted_as_the_same_sketch(model, train_batches):
    a = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16, seed=3)
    feats = a.featurize_loader(loader=train_batches, loss_fn=next_token_loss).phi
    a.close()
    b = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=np.int64(16), seed=np.int32(3)
    )
    again = b.featurize_loader(loader=train_batches, loss_fn=next_token_loss).phi
    assert all(again[name].equal(feats[name]) for name in feats)


@pytest.mark.parametrize("method", ["influence", "top", "featurize"])
def test_a_closed_estimator_says_it_is_closed_before_any_work(
    tmp_path, model, train_batches, query_batches, method
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    est.close()
    est.close()  # closing twice is harmless
    calls = []

    def counting(model, batch):
        calls.append(1)
        return next_token_loss(model, batch)

    loaded = []

    def load(p):
        loaded.append(p)
        return default_load_checkpoint(p)

    calls_of = {
        "influence": lambda: run_influence(
            est, path, train_batches, query_batches, loss_fn=counting, load_checkpoint_fn=load
        ),
        "top": lambda: est.top_influences(
            k=1,
            checkpoints=[path],
            train_loader=train_batches,
            query_loader=query_batches,
            loss_fn=counting,
            load_checkpoint_fn=load,
        ),
        "featurize": lambda: est.featurize_loader(loader=train_batches, loss_fn=counting),
    }
    with pytest.raises(RuntimeError, match=r"this estimator was closed \(close\(\) removed"):
        calls_of[method]()
    assert calls == [] and loaded == []
