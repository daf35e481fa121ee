"""Identity 3 of DESIGN §2: the exact estimator against torch.func per-sample gradients."""

from __future__ import annotations

import torch
from conftest import full_grads, per_use_grads, save_checkpoint, stacked

from sdi import CheckpointSpec, FullGradientTracInSDI
from sdi.toy import next_token_loss


def test_per_use_gradients_equal_unrolled_torch_func(model, train_batches):
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    feats = est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    names = [f"core.{k}" for k, _ in model.core.named_parameters()]
    assert list(feats.phi) == names and feats.steps == model.loop_steps and feats.n == 7
    ours = torch.cat([feats.phi[k].reshape(7, model.loop_steps, -1) for k in names], dim=2)
    want = per_use_grads(model, stacked(train_batches))
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)


def test_tracin_and_sdi_equal_gradient_inner_products(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model, lr=0.25)
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    out = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path)],
        train_loader=train_batches,
        query_loader=query_batches,
        loss_fn=next_token_loss,
    )
    g_train = full_grads(model, stacked(train_batches))  # through the tied loop, no per-step split
    g_query = full_grads(model, stacked(query_batches))
    want = 0.25 * g_train @ g_query.T  # eta from the optimizer's lr
    torch.testing.assert_close(out.tracin, want, rtol=1e-4, atol=1e-6)
    # Conservation checked independently: SDI's steps against the untied per-use gradients.
    uses = per_use_grads(model, stacked(query_batches))
    want_sdi = 0.25 * torch.einsum("id,jtd->ijt", g_train, uses)
    torch.testing.assert_close(out.sdi, want_sdi, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sdi.sum(-1), want, rtol=1e-4, atol=1e-6)
