"""Step slots (sdi.steps): prelude / loop / readout binning and expected step counts."""

from __future__ import annotations

import pytest
import torch
from conftest import per_use_grads, stacked

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import next_token_loss


def test_mixed_steps_bin_prelude_and_readout(tmp_path, model, train_batches):
    targets = [model.embed, model.core, model.head]
    with pytest.raises(RuntimeError, match="allow_mixed_steps"):
        FullGradientTracInSDI(model=model, target_modules=targets).featurize_loader(
            loader=train_batches, loss_fn=next_token_loss
        )
    est = FullGradientTracInSDI(model=model, target_modules=targets, allow_mixed_steps=True)
    feats = est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    assert feats.steps == model.loop_steps + 2
    spread = {k: v.flatten(2).norm(dim=(0, 2)) for k, v in feats.phi.items()}
    assert spread["embed.weight"][1:].eq(0).all() and spread["embed.weight"][0] > 0
    assert spread["head.weight"][:-1].eq(0).all() and spread["head.weight"][-1] > 0
    core = torch.cat(
        [feats.phi[f"core.{k}"].flatten(2) for k, _ in model.core.named_parameters()], 2
    )
    torch.testing.assert_close(
        core[:, 1:-1], per_use_grads(model, stacked(train_batches)), rtol=1e-4, atol=1e-6
    )


def test_expected_steps(model, train_batches):
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=16, expected_steps=3
    )
    assert est.featurize_loader(loader=train_batches, loss_fn=next_token_loss).steps == 3
    est.close()
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=16, expected_steps=5
    )
    with pytest.raises(RuntimeError, match="observed 3 loop steps but expected_steps=5"):
        est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
