"""Featurisation of one batch (sdi.featurize): reductions, parameter checks, precision, step sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import ESTIMATORS, run_influence, save_checkpoint, tiny_model

from sdi import ProjectedTracInSDI
from sdi.backend import get_backend
from sdi.featurize import Featurizer
from sdi.toy import next_token_loss, random_token_batches


@pytest.mark.parametrize("make", ESTIMATORS)
def test_mean_and_sum_reductions_agree(tmp_path, make, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    summed = run_influence(
        make(model=model, target_modules=model.core), path, train_batches, query_batches
    ).sdi
    mean_est = make(model=model, target_modules=model.core, loss_reduction="mean")
    mean = run_influence(mean_est, path, train_batches, query_batches).sdi
    scalar = run_influence(
        mean_est,
        path,
        train_batches,
        query_batches,
        loss_fn=lambda m, b: next_token_loss(m, b).mean(),
    ).sdi
    torch.testing.assert_close(mean, summed, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scalar, summed, rtol=1e-4, atol=1e-6)


def test_unknown_and_unused_parameters_are_reported(model, train_batches):
    with pytest.raises(ValueError, match="not parameters of model"):
        ProjectedTracInSDI(
            model=model, target_modules=[model.core, nn.Linear(2, 2)], projection_size=16
        )
    model.extra = nn.Linear(2, 2)
    est = ProjectedTracInSDI(
        model=model, target_modules=[model.core, model.extra], projection_size=16
    )
    with pytest.raises(RuntimeError, match="extra.weight"):
        est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_gives_fp32_features_close_to_fp32(model, train_batches, dtype):
    def features(m):
        est = ProjectedTracInSDI(model=m, target_modules=m.core, projection_size=64)
        feats = est.featurize_loader(
            loader=train_batches, loss_fn=lambda mm, b: next_token_loss(mm, b).float()
        )
        est.close()
        return torch.cat(list(feats.phi.values()), dim=2)

    full, half = features(model), features(tiny_model().to(dtype))
    assert half.dtype == torch.float32
    assert ((half - full).norm() / full.norm()).item() < 0.05  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("explicit", [True, False])
def test_summed_features_equal_per_step_features_summed(explicit):
    model = tiny_model(seed=2, steps=3)
    batch = random_token_batches(4, 4, 7, 19, seed=3)[0]
    featurizer = Featurizer(
        model=model,
        target_modules=model.core,
        projection_size=61,
        seed=1,
        backend=get_backend("torch"),
    )
    featurizer.rules.prefers_explicit = lambda *args: explicit
    per_step, steps = featurizer.compute_batch(batch, next_token_loss)
    summed, _ = featurizer.compute_batch(batch, next_token_loss, sum_steps=True)
    featurizer.close()
    assert steps == 3 and summed.shape == (4, featurizer.width)
    torch.testing.assert_close(summed, per_step.sum(dim=1), rtol=1e-4, atol=1e-5)


def _per_token_loss(model, batch):
    """Next-token cross-entropy per token ``(B, T - 1)``."""
    tokens = batch["tokens"]
    logits = model(tokens)[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def test_a_loss_of_the_wrong_length_names_the_shapes_and_the_fix(model):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    train = random_token_batches(12, 4, 7, 19, seed=3)
    # The per-token mean over the batch (dim 0) instead of the sequence: (T - 1,) = (6,) losses.
    with pytest.raises(ValueError) as err:
        est.featurize_loader(loader=train, loss_fn=lambda m, b: _per_token_loss(m, b).mean(dim=0))
    message = str(err.value)
    assert "returned 6 losses, but the selected modules saw a batch of 4" in message
    assert ".mean(dim=1), not .mean(dim=0)" in message
    # The right reduction passes, and gives one row per example.
    good = est.featurize_loader(loader=train, loss_fn=lambda m, b: _per_token_loss(m, b).mean(1))
    assert good.n == 12


def test_batch_first_false_on_batch_first_data_is_refused(model):
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=16, batch_first=False
    )
    train = random_token_batches(12, 4, 7, 19, seed=3)  # (B=4, T=7): the modules see 7 "examples"
    with pytest.raises(ValueError) as err:
        est.featurize_loader(loader=train, loss_fn=next_token_loss)
    message = str(err.value)
    assert "returned 4 losses, but the selected modules saw a batch of 7" in message
    assert "(dimension 1 of their outputs, batch_first=False)" in message
    assert message.endswith("pass batch_first=True.")


def test_a_scalar_loss_still_passes_the_length_check(model, train_batches):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    summed = est.featurize_loader(
        loader=train_batches, loss_fn=lambda m, b: next_token_loss(m, b).sum()
    )
    vector = est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    torch.testing.assert_close(summed.phi, vector.phi)


def test_an_empty_batch_is_refused(tmp_path, model, train_batches, query_batches):
    """Decision: a 0-example batch is an error (a loader bug, usually), not silently skipped."""
    empty = {"tokens": train_batches[0]["tokens"][:0]}
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    with pytest.raises(ValueError, match=r"shape \(0,\)\): the batch holds no example.*drop them"):
        est.featurize_loader(loader=[train_batches[0], empty], loss_fn=next_token_loss)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    with pytest.raises(ValueError, match="sdi refuses empty batches"):
        run_influence(est, path, [*train_batches, empty], query_batches)
    with pytest.raises(ValueError, match="sdi refuses empty batches"):  # a scalar loss of none
        est.featurize_loader(loader=[empty], loss_fn=lambda m, b: next_token_loss(m, b).sum())


def test_a_closed_featurizer_says_so(model, train_batches):
    f = Featurizer(model=model, target_modules=model.core, projection_size=None)
    f.compute_batch(train_batches[0], next_token_loss)
    assert not f.closed
    f.close()
    assert f.closed
    with pytest.raises(RuntimeError, match="this estimator was closed"):
        f.compute_batch(train_batches[0], next_token_loss)
