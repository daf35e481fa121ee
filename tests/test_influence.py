"""Contractions and output assembly (sdi.influence): modes, chunking, streaming, standard errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ESTIMATORS, run_influence, save_checkpoint, sketched, two_checkpoints

from sdi import FullGradientTracInSDI
from sdi.toy import next_token_loss, random_token_batches


@pytest.mark.parametrize("make", ESTIMATORS)
def test_modes_agree(tmp_path, make, model, train_batches, query_batches):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = make(model=model, target_modules=model.core)
    sdi = run_influence(
        est,
        path,
        train_batches,
        query_batches,
        with_step_matrix=True,
        train_chunk_size=2,
        query_chunk_size=3,
    )
    tracin = run_influence(est, path, train_batches, query_batches, mode="tracin")
    assert (
        sdi.sdi.shape == (7, 4, 3) and sdi.sdi_matrix.shape == (7, 4, 3, 3) and tracin.sdi is None
    )
    torch.testing.assert_close(tracin.tracin, sdi.sdi.sum(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sdi.tracin, sdi.sdi.sum(-1))
    torch.testing.assert_close(sdi.sdi_matrix.sum(2), sdi.sdi, rtol=1e-4, atol=1e-6)
    plain = run_influence(est, path, train_batches, query_batches)  # no chunking: same numbers
    torch.testing.assert_close(plain.sdi, sdi.sdi, rtol=1e-5, atol=1e-7)


def _dense(est, train, query):
    """The non-streaming answer: every feature in memory, contracted with einsum."""
    flat = lambda f: torch.cat(list(f.phi.values()), dim=2)  # noqa: E731
    tr = flat(est.featurize_loader(loader=train, loss_fn=next_token_loss))
    q = flat(est.featurize_loader(loader=query, loss_fn=next_token_loss))
    return torch.einsum("isd,jtd->ijst", tr, q)


@pytest.mark.parametrize(
    "max_query_bytes", [1 << 30, 1]
)  # one chunk; one train pass per query batch
def test_streaming_equals_dense(tmp_path, model, train_batches, max_query_bytes):
    query = random_token_batches(5, 2, 7, 19, seed=3)  # 3 query batches
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = sketched(model)
    matrix = _dense(est, train_batches, query)
    kw = dict(max_query_bytes=max_query_bytes)
    sdi = run_influence(est, path, train_batches, query, with_step_matrix=True, **kw)
    tracin = run_influence(est, path, train_batches, query, mode="tracin", **kw)
    torch.testing.assert_close(sdi.sdi_matrix, matrix, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sdi.sdi, matrix.sum(2), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tracin.tracin, matrix.sum((2, 3)), rtol=1e-4, atol=1e-6)


def test_standard_errors_option_matches_the_uncertainty_module(tmp_path, train_batches):
    from sdi.uncertainty import standard_errors

    a, b, specs = two_checkpoints(tmp_path, 0.5, 2.0)
    query = random_token_batches(5, 2, 7, 19, seed=3)
    est = sketched(a)
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
    assert (
        fast.sdi_se is None
        and run_influence(est, specs[0].path, train_batches, query).sdi_se is None
    )
    with pytest.raises(ValueError, match="sketched"):
        FullGradientTracInSDI(model=a, target_modules=a.core).influence_across_checkpoints(
            with_standard_errors=True, **common
        )


def _core_columns(model, names):
    """Column indices of the core parameters ``names`` (full model names) in the flat gradients of
    ``conftest.per_use_grads`` / ``full_grads`` (``model.core.named_parameters()`` order)."""
    cols, start = [], 0
    for name, p in model.core.named_parameters():
        if f"core.{name}" in names:
            cols.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(cols)


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("mode", ["sdi", "tracin"])
def test_by_parameter_shares_add_up_to_the_total(tmp_path, make, mode, model, train_batches):
    query = random_token_batches(5, 2, 7, 19, seed=3)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = make(model=model, target_modules=model.core)
    out = run_influence(
        est, path, train_batches, query, mode=mode, by_parameter=True, train_chunk_size=2
    )
    shares = out.sdi_by_parameter if mode == "sdi" else out.tracin_by_parameter
    other = out.tracin_by_parameter if mode == "sdi" else out.sdi_by_parameter
    total = out.sdi if mode == "sdi" else out.tracin
    assert other is None
    assert list(shares) == [f"core.{n}" for n, _ in model.core.named_parameters()]
    assert all(s.shape == total.shape for s in shares.values())
    assert all(s.abs().max() > 0 for s in shares.values())
    torch.testing.assert_close(sum(shares.values()), total, rtol=1e-5, atol=1e-6)
    plain = run_influence(est, path, train_batches, query, mode=mode)
    assert plain.sdi_by_parameter is None and plain.tracin_by_parameter is None
    torch.testing.assert_close(total, plain.sdi if mode == "sdi" else plain.tracin)


def test_exact_group_shares_equal_autograd_restricted_to_the_group(
    tmp_path, model, train_batches, query_batches
):
    from conftest import full_grads, per_use_grads, stacked

    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = FullGradientTracInSDI(model=model, target_modules=model.core)
    groups = {"attention": r"qkv|proj", "mlp": r"fc"}  # the norm's weight and bias: "other"
    out = run_influence(est, path, train_batches, query_batches, by_parameter=groups)
    assert list(out.sdi_by_parameter) == ["attention", "mlp", "other"]
    g_train = full_grads(model, stacked(train_batches)).double()  # (N_tr, P)
    phi_query = per_use_grads(model, stacked(query_batches)).double()  # (N_q, steps, P)
    members = {
        "attention": ["core.qkv.weight", "core.proj.weight"],
        "mlp": ["core.fc1.weight", "core.fc1.bias", "core.fc2.weight", "core.fc2.bias"],
        "other": ["core.norm.weight", "core.norm.bias"],
    }
    for name, params in members.items():
        cols = _core_columns(model, params)
        want = torch.einsum("ip,jtp->ijt", g_train[:, cols], phi_query[:, :, cols])
        torch.testing.assert_close(out.sdi_by_parameter[name].double(), want, rtol=1e-4, atol=1e-6)


def test_by_parameter_with_every_parameter_matched_has_no_other(tmp_path, model, train_batches):
    query = random_token_batches(3, 3, 7, 19, seed=4)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = sketched(model)
    out = run_influence(
        est,
        path,
        train_batches,
        query,
        mode="tracin",
        by_parameter={"weights": "weight$", "biases": "bias$"},
    )
    assert list(out.tracin_by_parameter) == ["weights", "biases"]
    torch.testing.assert_close(
        sum(out.tracin_by_parameter.values()), out.tracin, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"\['nothing'\] hold no selected parameter"):
        run_influence(est, path, train_batches, query, by_parameter={"nothing": "xyz"})


def test_by_parameter_alongside_a_train_store_and_the_step_matrix(tmp_path, model, train_batches):
    query = random_token_batches(3, 3, 7, 19, seed=6)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = sketched(model)
    plain = run_influence(est, path, train_batches, query, by_parameter=True)
    kw = dict(by_parameter=True, with_step_matrix=True, train_store=tmp_path / "store")
    written = run_influence(est, path, train_batches, query, **kw)
    read = run_influence(est, path, train_batches, query, **kw)  # from the store
    for out in (written, read):
        assert list(out.sdi_by_parameter) == list(plain.sdi_by_parameter)
        for name, share in plain.sdi_by_parameter.items():
            torch.testing.assert_close(out.sdi_by_parameter[name], share, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            sum(out.sdi_by_parameter.values()), out.sdi, rtol=1e-5, atol=1e-6
        )
