"""Featurisation of a loader (sdi.loaders): loader checks, the model's mode, non-finite rows."""

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


def _nan_features_of(*examples: torch.Tensor):
    """Next-token loss whose gradient is NaN for each of ``examples`` (token rows ``(T,)``)."""

    def loss_fn(model, batch):
        tokens = batch["tokens"]
        bad = torch.stack([(tokens == e).all(dim=1) for e in examples]).any(dim=0)
        return next_token_loss(model, batch) * torch.where(bad, torch.nan, 1.0)

    return loss_fn


def test_featurize_loader_refuses_a_one_shot_loader(model):
    batches = random_token_batches(4, 2, 7, 19, seed=1)
    with pytest.raises(TypeError, match="loader is an iterator, which can be iterated only once"):
        sketched(model).featurize_loader(loader=iter(batches), loss_fn=next_token_loss)


def test_nan_rows_are_warned_with_their_loader_rows(model):
    batches = random_token_batches(11, 4, 7, 19, seed=2)  # rows 0-3, 4-7, 8-10
    loss_fn = _nan_features_of(batches[1]["tokens"][1], batches[2]["tokens"][2])  # rows 5, 10
    with pytest.warns(RuntimeWarning) as record:
        features = sketched(model).featurize_loader(loader=batches, loss_fn=loss_fn)
    assert len(record) == 1 and record[0].filename == __file__
    assert str(record[0].message).startswith(
        "loader: NaN or infinite loss at rows [5, 10] and features at rows [5, 10]"
    )
    flat = torch.cat([p.flatten(1) for p in features.phi.values()], 1)
    assert (~torch.isfinite(flat).all(dim=1)).nonzero().flatten().tolist() == [5, 10]


def test_nan_train_rows_are_warned_also_when_read_from_a_store(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    train = random_token_batches(7, 3, 7, 19, seed=3)
    query = random_token_batches(2, 2, 7, 19, seed=4)
    loss_fn = _nan_features_of(train[2]["tokens"][0])  # row 6
    est, store = sketched(model), tmp_path / "store"
    with pytest.warns(RuntimeWarning, match=r"train_loader: NaN or infinite loss at rows \[6\]"):
        run_influence(est, path, train, query, loss_fn=loss_fn, train_store=store)
    # Read back from the complete store: the loss is not computed again, the features are checked.
    with pytest.warns(RuntimeWarning) as record:
        out = run_influence(est, path, train, query, loss_fn=loss_fn, train_store=store)
    assert [str(w.message)[:52] for w in record] == [
        "train_loader: NaN or infinite features at rows [6] ("
    ]
    assert torch.isnan(out.tracin[6]).all() and torch.isfinite(out.tracin[:6]).all()
