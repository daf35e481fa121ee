"""Fingerprints change with what the features depend on, and only with that."""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from sdi.fingerprints import checkpoint_fingerprint, loss_fn_fingerprint, model_fingerprint
from sdi.toy import LoopedTransformer, next_token_loss

SCALE = 2.0


def _loss_a(model, batch):
    return F.cross_entropy(model(batch["tokens"])[:, -1], batch["tokens"][:, 0], reduction="none")


def _loss_b(model, batch):  # same signature, other code
    return F.cross_entropy(model(batch["tokens"])[:, 0], batch["tokens"][:, -1], reduction="none")


def _loss_global(model, batch):
    return SCALE * next_token_loss(model, batch)


def _make_scaled(scale):
    def loss(model, batch):
        return scale * next_token_loss(model, batch)

    return loss


def _weighted(model, batch, weight=1.0):
    return weight * next_token_loss(model, batch)


def test_loss_fn_fingerprint_is_stable_and_sees_code_constants_and_closures(monkeypatch):
    assert loss_fn_fingerprint(_loss_a) == loss_fn_fingerprint(_loss_a)
    assert loss_fn_fingerprint(_loss_a) != loss_fn_fingerprint(_loss_b)
    assert loss_fn_fingerprint(_make_scaled(1.0)) == loss_fn_fingerprint(_make_scaled(1.0))
    assert loss_fn_fingerprint(_make_scaled(1.0)) != loss_fn_fingerprint(_make_scaled(3.0))
    tensor_a = _make_scaled(torch.tensor([1.0, 2.0]))
    tensor_b = _make_scaled(torch.tensor([1.0, 2.5]))
    assert loss_fn_fingerprint(tensor_a) != loss_fn_fingerprint(tensor_b)
    p1 = functools.partial(_weighted, weight=1.0)
    p2 = functools.partial(_weighted, weight=0.5)
    assert loss_fn_fingerprint(p1) != loss_fn_fingerprint(p2)
    before = loss_fn_fingerprint(_loss_global)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    assert loss_fn_fingerprint(_loss_global) != before


def test_model_fingerprint_sees_structure_and_loop_count_not_values():
    a = LoopedTransformer(vocab=11, d_model=8, n_heads=2, loop_steps=3, max_len=5)
    b = LoopedTransformer(vocab=11, d_model=8, n_heads=2, loop_steps=3, max_len=5)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    assert model_fingerprint(a) == model_fingerprint(b)  # values belong to checkpoints
    b.eval()
    assert model_fingerprint(a) == model_fingerprint(b)  # so does the train/eval mode
    c = LoopedTransformer(vocab=11, d_model=8, n_heads=2, loop_steps=4, max_len=5)
    assert model_fingerprint(a) != model_fingerprint(c)
    d = LoopedTransformer(vocab=12, d_model=8, n_heads=2, loop_steps=3, max_len=5)
    assert model_fingerprint(a) != model_fingerprint(d)


def test_checkpoint_fingerprint_covers_folder_contents(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights-1")
    (folder / "trainer_state.json").write_text("{}")
    first = checkpoint_fingerprint(folder)
    assert checkpoint_fingerprint(folder) == first
    (folder / "model.safetensors").write_bytes(b"weights-2")
    assert checkpoint_fingerprint(folder) != first
    file = tmp_path / "a.pt"
    file.write_bytes(b"x")
    digest = checkpoint_fingerprint(file)
    file.write_bytes(b"y")
    assert checkpoint_fingerprint(file) != digest
    assert checkpoint_fingerprint("not-a-path-key") == checkpoint_fingerprint("not-a-path-key")
    assert checkpoint_fingerprint("key-1") != checkpoint_fingerprint("key-2")
