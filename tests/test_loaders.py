"""Featurisation of a loader (sdi.loaders): loader checks, the model's mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import SEQ, VOCAB, run_influence, save_checkpoint, sketched
from torch.utils.data import DataLoader

from sdi import ProjectedTracInSDI
from sdi.toy import next_token_loss, random_token_batches


def test_shuffling_loader_warns_but_runs(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    tokens = torch.randint(0, 19, (6, 7))
    loader = DataLoader([{"tokens": t} for t in tokens], batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="train_loader reshuffles"):
        out = run_influence(sketched(model), path, loader, [{"tokens": tokens[:2]}], progress=True)
    assert out.sdi.shape == (6, 2, 3)


class _DropoutLM(nn.Module):
    """A looped model with dropout, to tell train mode from eval mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.core = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        for _ in range(2):
            x = self.drop(torch.tanh(self.core(x)))
        return self.head(x)


def test_featurize_loader_runs_in_eval_mode_and_restores_the_mode():
    model = _DropoutLM().train()
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16, seed=1)
    loader = random_token_batches(5, 2, SEQ, VOCAB, seed=3)
    first = est.featurize_loader(loader=loader, loss_fn=next_token_loss)
    assert model.training  # given back as it came
    second = est.featurize_loader(loader=loader, loss_fn=next_token_loss)
    assert model.training and model.drop.training
    model.eval()
    in_eval = est.featurize_loader(loader=loader, loss_fn=next_token_loss)
    assert not model.training  # an eval-mode model stays in eval mode
    for name, phi in first.phi.items():
        assert phi.shape == (5, 2, 16)
        assert torch.equal(phi, second.phi[name]), name  # dropout off: identical features
        assert torch.equal(phi, in_eval.phi[name]), name
