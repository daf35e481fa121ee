"""Streaming influence, query chunking, the feature store, top-k and loader checks."""

from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch
from conftest import save_checkpoint, tiny_model
from torch.utils.data import DataLoader

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import next_token_loss, random_token_batches


def _est(model, **kw):
    return ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=48, seed=5, **kw
    )


def _dense(est, train, query):
    """The non-streaming answer: every feature in memory, contracted with einsum."""
    flat = lambda f: torch.cat(list(f.phi.values()), dim=2)  # noqa: E731
    tr = flat(est.featurize_loader(loader=train, loss_fn=next_token_loss))
    q = flat(est.featurize_loader(loader=query, loss_fn=next_token_loss))
    return torch.einsum("isd,jtd->ijst", tr, q)


def _two_checkpoints(tmp_path, weight_a: float, weight_b: float):
    """Two tiny models (seeds 1, 2), saved as ``a.pt`` and ``b.pt``, and their specs."""
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    specs = [
        CheckpointSpec(save_checkpoint(tmp_path / "a.pt", a), weight_a),
        CheckpointSpec(save_checkpoint(tmp_path / "b.pt", b), weight_b),
    ]
    return a, b, specs


def _run(est, path, train, query, **kw):
    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
        **kw,
    )


@pytest.mark.parametrize(
    "max_query_bytes", [1 << 30, 1]
)  # one chunk; one train pass per query batch
def test_streaming_equals_dense(tmp_path, model, train_batches, max_query_bytes):
    query = random_token_batches(5, 2, 7, 19, seed=3)  # 3 query batches
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = _est(model)
    matrix = _dense(est, train_batches, query)
    kw = dict(max_query_bytes=max_query_bytes)
    sdi = _run(est, path, train_batches, query, with_step_matrix=True, **kw)
    tracin = _run(est, path, train_batches, query, mode="tracin", **kw)
    torch.testing.assert_close(sdi.sdi_matrix, matrix, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sdi.sdi, matrix.sum(2), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tracin.tracin, matrix.sum((2, 3)), rtol=1e-4, atol=1e-6)


def _peak_live_tensor_bytes(est, path, train, query):
    """Most bytes of live torch tensors seen at any featurised batch of a streaming run."""
    peak = [0]

    def loss_fn(model, batch):
        gc.collect()
        with warnings.catch_warnings():  # touching deprecated torch objects warns
            warnings.simplefilter("ignore")
            live = sum(
                o.numel() * o.element_size()
                for o in gc.get_objects()
                if isinstance(o, torch.Tensor)
            )
        peak[0] = max(peak[0], live)
        return next_token_loss(model, batch)

    out = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path)], train_loader=train, query_loader=query, loss_fn=loss_fn
    )
    return peak[0], out.sdi.numel() * 4


def test_memory_does_not_grow_with_train_set_beyond_the_output(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    query = random_token_batches(3, 3, 7, 19, seed=2)
    est = _est(model)
    small, small_out = _peak_live_tensor_bytes(
        est, path, random_token_batches(8, 4, 7, 19, seed=1), query
    )
    large, large_out = _peak_live_tensor_bytes(
        est, path, random_token_batches(32, 4, 7, 19, seed=1), query
    )
    # The reference design would keep every train feature: 24 more examples x steps x params x m.
    per_example = 3 * len(list(model.core.parameters())) * 48 * 4
    assert large - small <= (large_out - small_out) + per_example, (small, large, per_example)


def test_store_resumes_after_interruption_and_serves_other_query_sets(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    store = tmp_path / "store"
    est = _est(model)
    want = _run(est, path, train_batches, query_batches)

    class Killed(Exception):
        pass

    def dies_after_two():
        yield from train_batches[:2]
        raise Killed

    with pytest.raises(Killed):
        _run(est, path, dies_after_two(), query_batches, train_store=store)
    (folder,) = store.iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]

    calls = []

    def counting_loss(model, batch):
        calls.append(batch["tokens"].shape[0])
        return next_token_loss(model, batch)

    resumed = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=query_batches,
        loss_fn=counting_loss,
        train_store=store,
    )
    torch.testing.assert_close(resumed.sdi, want.sdi)
    assert calls == [4, 1]  # the query batch, then only the train batch not stored yet
    assert json.loads((folder / "manifest.json").read_text())["complete"]

    calls.clear()
    other_query = random_token_batches(2, 2, 7, 19, seed=9)
    reused = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=other_query,
        loss_fn=counting_loss,
        train_store=store,
    )
    assert calls == [2]  # train features came from disk
    torch.testing.assert_close(reused.sdi, _run(est, path, train_batches, other_query).sdi)


@pytest.mark.parametrize(
    "other",
    [
        lambda m: ProjectedTracInSDI(model=m, target_modules=m.core, projection_size=48, seed=6),
        lambda m: ProjectedTracInSDI(model=m, target_modules=m.core, projection_size=32, seed=5),
        lambda m: ProjectedTracInSDI(
            model=m, target_modules=m.core.fc1, projection_size=48, seed=5
        ),
        lambda m: FullGradientTracInSDI(model=m, target_modules=m.core),
    ],
    ids=["seed", "m", "params", "estimator"],
)
def test_store_refuses_other_settings(tmp_path, model, train_batches, query_batches, other):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    _run(_est(model), path, train_batches, query_batches, train_store=tmp_path / "s")
    model2 = tiny_model()  # same weights, fresh hooks
    with pytest.raises(ValueError, match="written for other settings"):
        _run(other(model2), path, train_batches, query_batches, train_store=tmp_path / "s")


def test_store_refuses_another_checkpoint_with_the_same_name(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = _est(model)
    first = _run(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    save_checkpoint(
        tmp_path / "ck.pt", tiny_model(seed=3)
    )  # overwritten: new content, new store folder
    second = _run(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    assert len(list((tmp_path / "s").iterdir())) == 2
    assert not torch.allclose(first.sdi, second.sdi)


def test_top_influences_equal_topk_of_dense(tmp_path, train_batches):
    a, b, specs = _two_checkpoints(tmp_path, 0.4, 1.1)
    query = random_token_batches(5, 2, 7, 19, seed=3)
    est = _est(a)
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


def test_shuffling_loader_warns_but_runs(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    tokens = torch.randint(0, 19, (6, 7))
    loader = DataLoader([{"tokens": t} for t in tokens], batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="train_loader reshuffles"):
        out = _run(_est(model), path, loader, [{"tokens": tokens[:2]}], progress=True)
    assert out.sdi.shape == (6, 2, 3)


def test_standard_errors_option_matches_the_uncertainty_module(tmp_path, train_batches):
    from sdi.uncertainty import standard_errors

    a, b, specs = _two_checkpoints(tmp_path, 0.5, 2.0)
    query = random_token_batches(5, 2, 7, 19, seed=3)
    est = _est(a)
    want_sdi, want_tracin = 0, 0
    for spec, model in zip(specs, (a, b), strict=True):
        a.load_state_dict(model.state_dict())
        tr = torch.cat(
            list(est.featurize_loader(loader=train_batches, loss_fn=next_token_loss).phi.values()),
            2,
        )
        q = torch.cat(
            list(est.featurize_loader(loader=query, loss_fn=next_token_loss).phi.values()), 2
        )
        sdi_se, tracin_se = standard_errors(
            tr.sum(1), q, [b.columns for b in est._featurizer.blocks], 48
        )
        want_sdi, want_tracin = (
            want_sdi + spec.weight * sdi_se,
            want_tracin + spec.weight * tracin_se,
        )
    common = dict(
        checkpoints=specs, train_loader=train_batches, query_loader=query, loss_fn=next_token_loss
    )
    out = est.influence_across_checkpoints(with_standard_errors=True, max_query_bytes=1, **common)
    fast = est.influence_across_checkpoints(with_standard_errors=True, mode="tracin", **common)
    assert out.sdi_se.shape == out.sdi.shape and out.tracin_se.shape == out.tracin.shape
    torch.testing.assert_close(out.sdi_se, want_sdi, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.tracin_se, want_tracin, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.tracin_se, want_tracin, rtol=1e-4, atol=1e-7)
    assert fast.sdi_se is None and _run(est, specs[0].path, train_batches, query).sdi_se is None
    with pytest.raises(ValueError, match="sketched"):
        FullGradientTracInSDI(model=a, target_modules=a.core).influence_across_checkpoints(
            with_standard_errors=True, **common
        )
