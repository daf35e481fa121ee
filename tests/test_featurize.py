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
