"""Top-k (sdi.topk): the most and least influential train examples per query."""

from __future__ import annotations

import pytest
import torch
from conftest import sketched, two_checkpoints

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
