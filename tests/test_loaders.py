"""Featurisation of a loader (sdi.loaders): loader checks."""

from __future__ import annotations

import pytest
import torch
from conftest import run_influence, save_checkpoint, sketched
from torch.utils.data import DataLoader


def test_shuffling_loader_warns_but_runs(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    tokens = torch.randint(0, 19, (6, 7))
    loader = DataLoader([{"tokens": t} for t in tokens], batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="train_loader reshuffles"):
        out = run_influence(sketched(model), path, loader, [{"tokens": tokens[:2]}], progress=True)
    assert out.sdi.shape == (6, 2, 3)
