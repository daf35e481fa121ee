"""Switching SDI_BACKEND changes speed only: the toy looped transformer gives the same SDI/TracIn."""

from __future__ import annotations

import os

os.environ.setdefault(
    "TRITON_INTERPRET", "1"
)  # Triton's CPU interpreter; read when kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import save_checkpoint  # noqa: E402

from sdi import CheckpointSpec, ProjectedTracInSDI  # noqa: E402
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches  # noqa: E402

pytest.importorskip("triton")


@pytest.mark.parametrize("m", [64, 96])  # a power of two and not
def test_triton_backend_matches_torch_end_to_end(tmp_path, monkeypatch, m):
    torch.manual_seed(m)
    model = LoopedTransformer(
        vocab=23, d_model=12, n_heads=2, loop_steps=3, max_len=9, norm_affine=True
    ).eval()
    model.embed.padding_idx = 0
    targets = [
        model.embed,
        model.core,
        model.head,
    ]  # Embedding, Linear weight/bias, LayerNorm, readout
    path = save_checkpoint(tmp_path / "ck.pt", model)
    train = random_token_batches(5, 3, 9, 23, seed=m)
    query = random_token_batches(3, 3, 9, 23, seed=m + 1)
    outputs = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("SDI_BACKEND", name)
        est = ProjectedTracInSDI(
            model=model, target_modules=targets, projection_size=m, seed=7, allow_mixed_steps=True
        )
        assert est._featurizer.rules.backend.name == name
        outputs[name] = est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(path)],
            train_loader=train,
            query_loader=query,
            loss_fn=next_token_loss,
            with_step_matrix=True,
        )
        est.close()
    ours, ref = outputs["triton"], outputs["torch"]
    assert ours.sdi.shape == (5, 3, 5)  # prelude + 3 loop steps + readout
    for key in ("sdi", "tracin", "sdi_matrix"):
        a, b = getattr(ours, key), getattr(ref, key)
        assert ((a - b).norm() / b.norm()).item() < 1e-4, key
