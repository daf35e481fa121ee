"""Checkpoints (sdi.checkpoints): weights eta_k, file formats, safe loading."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import ESTIMATORS, run_influence, save_checkpoint, tiny_model

from sdi import CheckpointSpec, ProjectedTracInSDI


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
