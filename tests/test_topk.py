"""Top-k (sdi.topk): the most and least influential train examples per query."""

from __future__ import annotations

import pytest
import torch
from conftest import save_checkpoint, sketched, two_checkpoints

from sdi.toy import next_token_loss, random_token_batches


def test_top_influences_equal_topk_of_dense(tmp_path, train_batches):
    a, b, specs = two_checkpoints(tmp_path, 0.4, 1.1)
    query = random_token_batches(5, 2, 7, 19, seed=3)
    est = sketched(a)
    common = dict(
        checkpoints=specs, train_loader=train_batches, query_loader=query, loss_fn=next_token_loss
    )
    dense = est.influence_across_checkpoints(**common)
    top = est.top_influences(k=3, max_query_bytes=1, train_store=tmp_path / "s", **common)
    most = torch.topk(dense.tracin, 3, dim=0)
    least = torch.topk(dense.tracin, 3, dim=0, largest=False)
    assert torch.equal(top.most_indices, most.indices.T) and torch.equal(
        top.least_indices, least.indices.T
    )
    torch.testing.assert_close(top.most_tracin, most.values.T)
    j = torch.arange(5)[:, None]
    torch.testing.assert_close(top.most_sdi, dense.sdi[top.most_indices, j], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(top.least_sdi, dense.sdi[top.least_indices, j], rtol=1e-4, atol=1e-6)
    with pytest.warns(UserWarning, match="exceeds the 7 train examples"):
        assert est.top_influences(k=9, **common).most_indices.shape == (5, 7)


def _nan_loss_of(*examples: torch.Tensor):
    """Next-token loss of which each of ``examples`` (token rows ``(T,)``) is scaled by NaN: its
    gradient, so its features, become NaN (the other examples' are untouched)."""

    def loss_fn(model, batch):
        loss = next_token_loss(model, batch)
        tokens = batch["tokens"]
        bad = torch.stack([(tokens == e).all(dim=1) for e in examples]).any(dim=0)
        return loss * torch.where(bad, torch.nan, 1.0)

    return loss_fn


def test_a_nan_loss_example_is_never_ranked(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    train = random_token_batches(10, 3, 7, 19, seed=21)  # batches 3, 3, 3, 1
    query = random_token_batches(4, 4, 7, 19, seed=22)
    est = sketched(model)
    clean = est.influence_across_checkpoints(
        checkpoints=[path], train_loader=train, query_loader=query, loss_fn=next_token_loss
    ).tracin
    with pytest.warns(RuntimeWarning) as record:
        top = est.top_influences(
            k=4,
            checkpoints=[path],
            train_loader=train,
            query_loader=query,
            loss_fn=_nan_loss_of(train[1]["tokens"][1]),  # loader row 4
        )
    messages = {str(w.message) for w in record}
    assert any(
        m.startswith("train_loader: NaN or infinite loss at rows [4] and features at rows [4]")
        for m in messages
    ), messages
    assert any(m.startswith("top_influences: 4 TracIn scores are NaN") for m in messages)
    assert all(w.filename == __file__ for w in record)  # each points at the call
    # The ranking is the clean ranking of the other nine examples.
    others = torch.tensor([i for i in range(10) if i != 4])
    most = clean[others].topk(4, dim=0)
    least = clean[others].topk(4, dim=0, largest=False)
    assert torch.equal(top.most_indices, others[most.indices].T)
    assert torch.equal(top.least_indices, others[least.indices].T)
    torch.testing.assert_close(top.most_tracin, most.values.T)
    assert torch.isfinite(top.most_sdi).all() and torch.isfinite(top.least_sdi).all()
    assert top.n_excluded.tolist() == [1, 1, 1, 1]


def test_queries_with_fewer_finite_scores_than_k_end_with_minus_one(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    train = random_token_batches(5, 5, 7, 19, seed=23)
    query = random_token_batches(3, 3, 7, 19, seed=24)
    loss_fn = _nan_loss_of(train[0]["tokens"][0], query[0]["tokens"][2])
    with pytest.warns(RuntimeWarning, match="query_loader: NaN or infinite loss at rows \\[2\\]"):
        top = sketched(model).top_influences(
            k=5, checkpoints=[path], train_loader=train, query_loader=query, loss_fn=loss_fn
        )
    assert top.n_excluded.tolist() == [1, 1, 5]  # train row 0 for every query; all for query 2
    for side in ("most", "least"):
        indices, tracin = getattr(top, f"{side}_indices"), getattr(top, f"{side}_tracin")
        sdi = getattr(top, f"{side}_sdi")
        assert sorted(indices[0, :4].tolist()) == [1, 2, 3, 4] and indices[0, 4] == -1
        assert torch.isfinite(tracin[:2, :4]).all() and torch.isnan(tracin[:2, 4]).all()
        assert indices[2].tolist() == [-1] * 5 and torch.isnan(tracin[2]).all()
        assert torch.isnan(sdi[2]).all() and torch.isfinite(sdi[:2, :4]).all()


@pytest.mark.parametrize("k", [2.5, 3.0, True, "3"])
def test_a_non_integer_k_fails_before_any_work(tmp_path, model, train_batches, k):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    calls = []

    def counting(model, batch):
        calls.append(1)
        return next_token_loss(model, batch)

    with pytest.raises(TypeError, match="k must be an integer"):
        sketched(model).top_influences(
            k=k,
            checkpoints=[path],
            train_loader=train_batches,
            query_loader=train_batches,
            loss_fn=counting,
        )
    assert calls == []  # no TracIn pass ran
