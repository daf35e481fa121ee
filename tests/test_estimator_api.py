"""The drop-in API: modes, checkpoints, reductions, step bins, error paths, hook hygiene."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import full_grads, per_use_grads, save_checkpoint, stacked, tiny_model

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import LoopedTransformer, next_token_loss

ESTIMATORS = [
    pytest.param(lambda **kw: ProjectedTracInSDI(projection_size=64, seed=1, **kw), id="projected"),
    pytest.param(lambda **kw: FullGradientTracInSDI(**kw), id="exact"),
]


def _run(est, path, train, query, **kw):
    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path)] if isinstance(path, str) else path,
        train_loader=train,
        query_loader=query,
        loss_fn=kw.pop("loss_fn", next_token_loss),
        **kw,
    )


@pytest.mark.parametrize("make", ESTIMATORS)
def test_modes_agree(tmp_path, make, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = make(model=model, target_modules=model.core)
    sdi = _run(
        est,
        path,
        train_batches,
        query_batches,
        with_step_matrix=True,
        train_chunk_size=2,
        query_chunk_size=3,
    )
    tracin = _run(est, path, train_batches, query_batches, mode="tracin")
    assert (
        sdi.sdi.shape == (7, 4, 3) and sdi.sdi_matrix.shape == (7, 4, 3, 3) and tracin.sdi is None
    )
    torch.testing.assert_close(tracin.tracin, sdi.sdi.sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sdi.tracin, sdi.sdi.sum(-1))
    torch.testing.assert_close(sdi.sdi_matrix.sum(2), sdi.sdi, rtol=1e-4, atol=1e-6)
    plain = _run(est, path, train_batches, query_batches)  # no chunking: same numbers
    torch.testing.assert_close(plain.sdi, sdi.sdi, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_checkpoint_weights_sum_linearly(tmp_path, make, train_batches, query_batches):
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    pa, pb = save_checkpoint(tmp_path / "a.pt", a, lr=0.3), save_checkpoint(tmp_path / "b.pt", b)
    est = make(model=a, target_modules=a.core)
    one = _run(est, [CheckpointSpec(pa, weight=1.0)], train_batches, query_batches).sdi
    two = _run(est, [CheckpointSpec(pb, weight=1.0)], train_batches, query_batches).sdi
    both = _run(
        est, [CheckpointSpec(pa), CheckpointSpec(pb, weight=0.7)], train_batches, query_batches
    )
    torch.testing.assert_close(both.sdi, 0.3 * one + 0.7 * two, rtol=1e-4, atol=1e-6)  # 0.3: the lr


@pytest.mark.parametrize("make", ESTIMATORS)
def test_mean_and_sum_reductions_agree(tmp_path, make, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    summed = _run(
        make(model=model, target_modules=model.core), path, train_batches, query_batches
    ).sdi
    mean_est = make(model=model, target_modules=model.core, loss_reduction="mean")
    mean = _run(mean_est, path, train_batches, query_batches).sdi
    scalar = _run(
        mean_est,
        path,
        train_batches,
        query_batches,
        loss_fn=lambda m, b: next_token_loss(m, b).mean(),
    ).sdi
    torch.testing.assert_close(mean, summed, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scalar, summed, rtol=1e-4, atol=1e-6)


def test_checkpoint_formats(tmp_path, model, train_batches, query_batches):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=32)
    want = _run(est, save_checkpoint(tmp_path / "a.pt", model), train_batches, query_batches).tracin
    for i, ckpt in enumerate([{"state_dict": model.state_dict()}, model.state_dict()]):
        torch.save(ckpt, tmp_path / f"{i}.pt")
        torch.testing.assert_close(
            _run(est, str(tmp_path / f"{i}.pt"), train_batches, query_batches).tracin, want
        )


def test_pickled_checkpoint_needs_opt_in(tmp_path, model, train_batches, query_batches):
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": model.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=32)
    with pytest.raises(RuntimeError, match="load_checkpoint_fn"):
        _run(est, str(path), train_batches, query_batches)
    out = _run(
        est,
        str(path),
        train_batches,
        query_batches,
        load_checkpoint_fn=lambda p: torch.load(p, weights_only=False),
    )
    assert out.tracin.shape == (7, 4)


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


@pytest.mark.parametrize(
    "module,culprit",
    [
        (nn.BatchNorm1d(4), "buffers"),
        (nn.Embedding(4, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
    ],
)
def test_unsupported_parameters_are_named(module, culprit):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(NotImplementedError, match=culprit) as err:
        ProjectedTracInSDI(model=model, target_modules=model, projection_size=8)
    assert "'1" in str(err.value) and type(module).__name__ in str(err.value)  # names module "1"


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
        _run(est, path, train_batches, query_batches, mode="exact")
    with pytest.raises(ValueError, match="with_step_matrix"):
        _run(est, path, train_batches, query_batches, mode="tracin", with_step_matrix=True)
    with pytest.raises(ValueError, match="per-example losses"):
        est.featurize_loader(
            loader=train_batches, loss_fn=lambda m, b: next_token_loss(m, b)[:, None]
        )


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
