"""The paper bench's exact oracle (bench/paper/oracle.py: per-step parameter copies, plain autograd)
equals FullGradientTracInSDI on a small version of the paper's looped GPT, for every open choice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sdi import CheckpointSpec, FullGradientTracInSDI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "paper"))
from model import PaperConfig, build, next_token_loss, random_sequences  # noqa: E402
from oracle import exact_influence  # noqa: E402

SMALL = dict(vocab=23, d_model=16, n_heads=2, loop_steps=3, seq_len=7)


@pytest.mark.parametrize(
    "choices",
    [{}, {"positions": "none", "loop_start": "zeros", "adapter": "add"}, {"loop_start": "noise"}],
    ids=["defaults", "alternatives", "noise start"],
)
def test_oracle_equals_full_gradient_estimator(tmp_path, choices):
    config = PaperConfig(**SMALL, **choices)
    model = build(config, seed=3)
    with torch.no_grad():  # away from the init's zero biases and unit norms: every tensor counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = random_sequences(3, config, seed=4)
    oracle = exact_influence(model, tokens, next_token_loss)
    assert oracle.consistency < 1e-5  # sum of per-step copies' grads == plain per-example grad

    path = tmp_path / "model.pt"
    torch.save({"model_state_dict": model.state_dict()}, path)
    est = FullGradientTracInSDI(model=model, target_modules=model.recurrent)
    batches = [{"tokens": tokens[:2]}, {"tokens": tokens[2:]}]
    out = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(str(path), weight=1.0)],
        train_loader=batches,
        query_loader=batches,
        loss_fn=next_token_loss,
    )
    est.close()
    assert out.sdi.shape == (3, 3, config.loop_steps)
    scale = oracle.sdi.abs().max()
    torch.testing.assert_close(out.sdi.double(), oracle.sdi, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(
        out.tracin.double(), oracle.tracin, rtol=0, atol=1e-5 * oracle.tracin.abs().max()
    )
    torch.testing.assert_close(oracle.sdi.sum(dim=2), oracle.tracin, rtol=1e-6, atol=0)
