"""Hooks (sdi.hooks): inert outside calls, removed by close, in-place ops, sequence-first models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import full_grads, per_use_grads, stacked

from sdi import FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import LoopedTransformer, next_token_loss


def test_hooks_are_inert_outside_calls_and_gone_after_close(model, train_batches):
    tokens = train_batches[0]["tokens"]
    model.zero_grad()
    next_token_loss(model, {"tokens": tokens}).sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after featurisation
    model.zero_grad()
    next_token_loss(model, {"tokens": tokens}).sum().backward()  # ordinary training step: untouched
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k])
    assert est._featurizer._pass is None
    assert model.core.fc1._forward_hooks
    est.close()
    assert not any(m._forward_hooks for m in model.modules())


class _InplaceBlock(nn.Module):
    """fc1 and fc2 outputs are modified in place right after the hooked call."""

    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.fc1(self.norm(x))
        h.mul_(0.5)
        y = self.fc2(F.gelu(h))
        y += x
        return y


def test_inplace_ops_after_hooked_modules(model, train_batches):
    model.core = _InplaceBlock(12)
    feats = FullGradientTracInSDI(model=model, target_modules=model.core).featurize_loader(
        loader=train_batches, loss_fn=next_token_loss
    )
    ours = torch.cat(
        [feats.phi[f"core.{k}"].flatten(2) for k, _ in model.core.named_parameters()], 2
    )
    torch.testing.assert_close(
        ours, per_use_grads(model, stacked(train_batches)), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        ours.sum(1), full_grads(model, stacked(train_batches)), rtol=1e-4, atol=1e-6
    )


class _SeqFirst(nn.Module):
    """A looped model that works on (T, B, d) tensors: batch_first=False."""

    def __init__(self, inner: LoopedTransformer):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):  # tokens (B, T)
        x = (
            (self.inner.embed(tokens) + self.inner.pos[: tokens.shape[1]])
            .transpose(0, 1)
            .contiguous()
        )
        for _ in range(self.inner.loop_steps):
            x = x + self.inner.core.fc2(F.gelu(self.inner.core.fc1(x)))
        return self.inner.head(x.transpose(0, 1))


def test_batch_first_false(model, train_batches):
    seq_first = _SeqFirst(model)
    targets = [model.core.fc1, model.core.fc2]
    for make in (lambda **kw: ProjectedTracInSDI(projection_size=32, **kw), FullGradientTracInSDI):
        est_tb = make(
            model=seq_first, target_modules=targets, batch_first=False, loss_reduction="mean"
        )
        tb = est_tb.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
        est_tb.close()
        bt = _BatchFirst(model)
        est_bt = make(model=bt, target_modules=targets)
        ref = est_bt.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
        est_bt.close()
        for k in ref.phi:
            torch.testing.assert_close(
                tb.phi[k.replace("inner.", "inner.")], ref.phi[k], rtol=1e-4, atol=1e-6
            )


class _BatchFirst(_SeqFirst):
    def forward(self, tokens):
        x = self.inner.embed(tokens) + self.inner.pos[: tokens.shape[1]]
        for _ in range(self.inner.loop_steps):
            x = x + self.inner.core.fc2(F.gelu(self.inner.core.fc1(x)))
        return self.inner.head(x)
