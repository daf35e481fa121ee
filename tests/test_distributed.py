"""Sharding over processes: 2 gloo ranks on 127.0.0.1 must return what one process returns."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SEQ, VOCAB, save_checkpoint, tiny_model

from sdi import CheckpointSpec, ProjectedTracInSDI, distributed, influence
from sdi.store import describe
from sdi.toy import next_token_loss, random_token_batches

WORLD = 2
JOIN_TIMEOUT_S = 90  # the whole launch; the process group's own timeout is 30 s


def _data(folder: Path):
    """The runs' inputs, rebuilt identically in every process.

    5 train batches (2, 2, 2, 2, 1): rank 0 owns 3, rank 1 owns 2, one of them ragged.
    """
    specs = [
        CheckpointSpec(str(folder / "a.pt"), 0.4),
        CheckpointSpec(str(folder / "b.pt"), 1.1),
    ]
    common = dict(
        checkpoints=specs,
        train_loader=random_token_batches(9, 2, SEQ, VOCAB, seed=11),
        query_loader=random_token_batches(5, 2, SEQ, VOCAB, seed=12),
        loss_fn=next_token_loss,
    )
    return common


def _nan_on_train_row_2(model, batch):
    """Next-token loss, NaN-scaled (so NaN features) for train row 2: rank 1's first batch."""
    row = random_token_batches(9, 2, SEQ, VOCAB, seed=11)[1]["tokens"][0]
    bad = (batch["tokens"] == row).all(dim=1)
    return next_token_loss(model, batch) * torch.where(bad, torch.nan, 1.0)


def _estimator():
    model = tiny_model()
    return ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=48, seed=5)


def _as_dict(out):
    return None if out is None else dataclasses.asdict(out)


def _runs(est, common, folder: Path, rank: int) -> dict:
    """Everything the sharded runs return, by name (keys shared with :func:`_expected`)."""
    one_batch = dict(common, train_loader=common["train_loader"][:1])  # rank 1 owns no batch
    batch_sizes = []

    def count_forwards(
        module, args
    ):  # a hook: a wrapping loss_fn would be another loss to the store
        batch_sizes.append(int(args[0].shape[0]))

    est.model.register_forward_pre_hook(count_forwards)

    train = common["train_loader"]
    features = {  # first: the model still holds its own weights, no checkpoint's
        "features_all": est.featurize_loader(loader=train, loss_fn=next_token_loss),
        "features_calls": list(batch_sizes),
        "features_1": _as_dict(
            est.featurize_loader(loader=train, loss_fn=next_token_loss, gather_to=1)
        ),
        "features_local": _as_dict(
            est.featurize_loader(loader=train, loss_fn=next_token_loss, gather_to=None)
        ),
    }
    features["features_all"] = _as_dict(features["features_all"])
    out = {
        "matrix": est.influence_across_checkpoints(with_step_matrix=True, **common),
        "sdi_chunked": est.influence_across_checkpoints(
            gather_to="all", max_query_bytes=1, **common
        ),
        "tracin": est.influence_across_checkpoints(mode="tracin", gather_to=1, **common),
        "local": est.influence_across_checkpoints(gather_to=None, **common),
        "top": est.top_influences(k=3, gather_to="all", **common),
        "top_store": est.top_influences(
            k=2, max_query_bytes=1, train_store=folder / "store", **common
        ),
        "one_batch": est.influence_across_checkpoints(gather_to="all", **one_batch),
        "top_one_batch": est.top_influences(k=1, gather_to="all", **one_batch),
        "top_nan": est.top_influences(
            k=3, gather_to="all", **dict(common, loss_fn=_nan_on_train_row_2)
        ),
    }
    batch_sizes.clear()
    out["stored"] = est.influence_across_checkpoints(train_store=folder / "store", **common)
    out = {key: _as_dict(value) for key, value in out.items()}
    out["stored_calls"] = batch_sizes
    return {**out, **features}


def _expected(folder: Path) -> dict:
    common = _data(folder)
    one_batch = dict(common, train_loader=common["train_loader"][:1])
    est = _estimator()
    out = {
        "features": est.featurize_loader(loader=common["train_loader"], loss_fn=next_token_loss),
        "matrix": est.influence_across_checkpoints(with_step_matrix=True, **common),
        "sdi": est.influence_across_checkpoints(**common),
        "tracin": est.influence_across_checkpoints(mode="tracin", **common),
        "top": est.top_influences(k=3, **common),
        "top2": est.top_influences(k=2, **common),
        "one_batch": est.influence_across_checkpoints(**one_batch),
        "top_one_batch": est.top_influences(k=1, **one_batch),
        "top_nan": est.top_influences(k=3, **dict(common, loss_fn=_nan_on_train_row_2)),
    }
    return {key: _as_dict(value) for key, value in out.items()}


def _fail_on_rank_1(est, common, folder: Path, rank: int) -> dict:
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 5:  # 3 query batches, then rank 1's second train batch
            raise ValueError("boom on rank 1")
        return next_token_loss(model, batch)

    est.influence_across_checkpoints(**dict(common, loss_fn=loss_fn))
    return {}


def _fail_features_on_rank_1(est, common, folder: Path, rank: int) -> dict:
    def loss_fn(model, batch):
        if rank == 1:
            raise ValueError("boom on rank 1")
        return next_token_loss(model, batch)

    est.featurize_loader(loader=common["train_loader"], loss_fn=loss_fn)
    return {}


def _error_of(call) -> str:
    """``call()``'s error as ``"Type: message"`` (the ranks go on together after it)."""
    try:
        call()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _disagreeing_ranks(est, common, folder: Path, rank: int) -> dict:
    """Each call gives rank 1 something else than rank 0; the last one agrees again."""
    first, _ = common["checkpoints"]
    checkpoints = common["checkpoints"] if rank == 0 else [first, first]
    model = tiny_model()
    seeded = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=48, seed=5 + rank
    )
    train = common["train_loader"] if rank == 0 else common["train_loader"][:4]  # 5 vs 4 batches
    return {
        "checkpoints": _error_of(
            lambda: est.influence_across_checkpoints(**dict(common, checkpoints=checkpoints))
        ),
        "seed": _error_of(lambda: seeded.top_influences(k=2, gather_to="all", **common)),
        "batches": _error_of(
            lambda: est.influence_across_checkpoints(**dict(common, train_loader=train))
        ),
        "loader": _error_of(lambda: est.featurize_loader(loader=train, loss_fn=next_token_loss)),
        "after": _as_dict(est.influence_across_checkpoints(gather_to="all", **common)),
    }


def _failing_loops(est, common, folder: Path, rank: int) -> dict:
    """Rank 1 raises in the estimators' own loops: influence's accumulation, top-k's second pass."""
    real_accumulate, real_query_sdi = influence.accumulate, influence.query_sdi

    def accumulate(totals, scores, weight):
        if rank == 1 and totals is not None:  # at the second checkpoint
            raise ValueError("accumulate boom on rank 1")
        return real_accumulate(totals, scores, weight)

    def query_sdi(*args, **kwargs):  # top-k's second pass only (its first pass is TracIn)
        if rank == 1:
            raise ValueError("query_sdi boom on rank 1")
        return real_query_sdi(*args, **kwargs)

    out = {}
    try:
        influence.accumulate = accumulate
        out["loop"] = _error_of(lambda: est.influence_across_checkpoints(**common))
        influence.accumulate = real_accumulate
        influence.query_sdi = query_sdi
        out["topk"] = _error_of(lambda: est.top_influences(k=2, gather_to="all", **common))
    finally:
        influence.accumulate, influence.query_sdi = real_accumulate, real_query_sdi
    out["after"] = _as_dict(est.influence_across_checkpoints(gather_to="all", **common))
    return out


def _worker(rank: int, port: int, scenario: str, folder: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # two processes on two cores
    folder = Path(folder)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
            # Short for the failure scenarios: a regression that hangs fails fast instead.
            timeout=timedelta(seconds=30 if scenario == "runs" else 15),
        )
        run = {
            "runs": _runs,
            "fail": _fail_on_rank_1,
            "fail_features": _fail_features_on_rank_1,
            "disagree": _disagreeing_ranks,
            "fail_loops": _failing_loops,
        }[scenario]
        torch.save(run(_estimator(), _data(folder), folder, rank), folder / f"rank{rank}.pt")
        # Both ranks done before either tears the group down: a rank destroying it while the
        # other still talks to rank 0's store aborted now and then ("terminate called without
        # an active exception", exit code -6).
        dist.barrier()
    except BaseException:
        (folder / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: Path, scenario: str) -> list[int]:
    """Run ``scenario`` on ``WORLD`` spawned ranks; their exit codes (a hang fails the test)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, port, scenario, str(folder)))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT_S} s"
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    save_checkpoint(folder / "a.pt", tiny_model(seed=1))
    save_checkpoint(folder / "b.pt", tiny_model(seed=2))
    return folder


def _close(got: dict | None, want: dict) -> None:
    assert got is not None
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        elif value.dtype == torch.int64:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_two_ranks_equal_one_process(checkpoints):
    codes = _launch(checkpoints, "runs")
    errors = [(checkpoints / f"rank{r}.err") for r in range(WORLD)]
    assert codes == [0] * WORLD, [e.read_text() for e in errors if e.exists()]
    got = [torch.load(checkpoints / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    want = _expected(checkpoints)

    _close(got[0]["matrix"], want["matrix"])  # gather_to=0 by default
    assert got[1]["matrix"] is None
    for rank in range(WORLD):  # gather_to="all"
        _close(got[rank]["sdi_chunked"], want["sdi"])
        _close(got[rank]["top"], want["top"])
        _close(got[rank]["one_batch"], want["one_batch"])
        _close(got[rank]["top_one_batch"], want["top_one_batch"])
        _close(got[rank]["top_nan"], want["top_nan"])  # the NaN row of rank 1: never ranked
    assert want["top_nan"]["n_excluded"].tolist() == [1] * 5
    assert (want["top_nan"]["most_indices"] != 2).all()
    assert torch.isfinite(want["top_nan"]["most_tracin"]).all()
    _close(got[1]["tracin"], want["tracin"])  # gather_to=1
    assert got[0]["tracin"] is None

    # gather_to=None: each rank keeps the rows of its batches (2 rows per batch but the last one).
    rows = [[0, 1, 4, 5, 8], [2, 3, 6, 7]]
    for rank in range(WORLD):
        torch.testing.assert_close(got[rank]["local"]["sdi"], want["sdi"]["sdi"][rows[rank]])

    # featurize_loader: each rank featurises its own batches only; gather_to="all" by default.
    want_phi = want["features"]["phi"]
    assert [got[rank]["features_calls"] for rank in range(WORLD)] == [[2, 2, 1], [2, 2]]
    for rank in range(WORLD):
        _close(got[rank]["features_all"]["phi"], want_phi)
        assert got[rank]["features_all"]["steps"] == want["features"]["steps"]
        local = got[rank]["features_local"]["phi"]
        _close(local, {name: value[rows[rank]] for name, value in want_phi.items()})
    _close(got[1]["features_1"]["phi"], want_phi)
    assert got[0]["features_1"] is None

    # The store: one folder per rank, written by the first run and read by the later ones.
    _close(got[0]["top_store"], want["top2"])
    assert got[1]["top_store"] is None
    _close(got[0]["stored"], want["sdi"])
    for rank in range(WORLD):
        assert got[rank]["stored_calls"] == [2, 2, 1] * 2  # query batches only, per checkpoint
    folders = sorted((checkpoints / "store").glob("*/rank*-of2"))
    assert sorted(f.name for f in folders) == ["rank0-of2", "rank0-of2", "rank1-of2", "rank1-of2"]
    for folder in folders:  # one checkpoint each
        described = describe(folder)
        rank = int(folder.name[4])
        assert described["complete"]
        assert described["identity"]["shard"] == {"rank": rank, "world_size": WORLD}
        assert described["rows"] == [[2, 2, 1], [2, 2]][rank]


@pytest.mark.parametrize("scenario", ["fail", "fail_features"])
def test_a_failing_rank_fails_every_rank_without_hanging(checkpoints, tmp_path, scenario):
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes((checkpoints / name).read_bytes())
    codes = _launch(tmp_path, scenario)
    assert all(code != 0 for code in codes), codes
    assert "ValueError: boom on rank 1" in (tmp_path / "rank1.err").read_text()
    err0 = (tmp_path / "rank0.err").read_text()
    # Rank 0 learnt why from rank 1 itself, instead of timing out on a silent peer.
    assert "RankFailed: rank 1 failed: ValueError: boom on rank 1" in err0, err0


def _one_process_sdi(folder: Path) -> dict:
    return _as_dict(_estimator().influence_across_checkpoints(**_data(folder)))


def _copy_checkpoints(checkpoints: Path, folder: Path) -> None:
    for name in ("a.pt", "b.pt"):
        (folder / name).write_bytes((checkpoints / name).read_bytes())


def _results(folder: Path, codes: list[int]) -> list[dict]:
    errors = [folder / f"rank{r}.err" for r in range(WORLD)]
    assert codes == [0] * WORLD, [e.read_text() for e in errors if e.exists()]
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_given_different_inputs_all_raise_an_error_naming_the_field(checkpoints, tmp_path):
    _copy_checkpoints(checkpoints, tmp_path)
    got = _results(tmp_path, _launch(tmp_path, "disagree"))
    want = _one_process_sdi(tmp_path)
    for rank in range(WORLD):
        out = got[rank]
        mismatch = "RankMismatchError: the ranks were given different "
        assert out["checkpoints"].startswith(mismatch), out["checkpoints"]
        assert "checkpoints (rank 0: [" in out["checkpoints"]
        assert "checkpoint weights (rank 0: [0.4, 1.1], rank 1: [0.4, 0.4])" in out["checkpoints"]
        assert out["seed"] == mismatch + (
            "seed (rank 0: 5, rank 1: 6): every rank must get the same checkpoints, estimator "
            "settings, parameters and loaders"
        )
        assert out["batches"].startswith(mismatch + "train batches (rank 0: 5, rank 1: 4)")
        assert out["loader"].startswith(mismatch + "loader batches (rank 0: 5, rank 1: 4)")
        _close(out["after"], want)  # the ranks stayed in step: the next call is right


def test_an_error_in_the_estimators_own_loops_reaches_the_other_rank(checkpoints, tmp_path):
    _copy_checkpoints(checkpoints, tmp_path)
    got = _results(tmp_path, _launch(tmp_path, "fail_loops"))
    assert got[1]["loop"] == "ValueError: accumulate boom on rank 1"
    assert got[0]["loop"] == "RankFailed: rank 1 failed: ValueError: accumulate boom on rank 1"
    assert got[1]["topk"] == "ValueError: query_sdi boom on rank 1"
    assert got[0]["topk"] == "RankFailed: rank 1 failed: ValueError: query_sdi boom on rank 1"
    want = _one_process_sdi(tmp_path)
    for rank in range(WORLD):
        _close(got[rank]["after"], want)


def _public(cls) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_one_process_gets_a_local_sharding_with_the_distributed_interface():
    assert not dist.is_initialized()
    sharding = distributed.sharding_of([1, 2], torch.device("cpu"), to=None)
    assert isinstance(sharding, distributed.LocalSharding)
    missing = _public(distributed.Sharding) - _public(distributed.LocalSharding) - {"comm", "to"}
    assert not missing, missing
    loader = [{"x": 1}, {"x": 2}]
    assert list(sharding.owned(loader)) == loader  # every batch is this process's
    assert sharding.total(5) == 5
    sharding.require_receiver("top_influences")  # gather_to=None is fine alone
    sharding.fail(ValueError("nobody waits"))
    assert sharding.store_identity == {} and sharding.store_folder(Path("s")) == Path("s")
    rows = {"tracin": torch.ones(3, 2)}
    assert sharding.gather(rows, counts=[2, 1]) is rows
    assert sharding.merge_top(rows, 1, counts=[3]) is rows


@pytest.mark.parametrize("what", ["gather", "merge_top"])
def test_local_sharding_refuses_a_loader_without_rows(what):
    sharding = distributed.sharding_of([], torch.device("cpu"), to=0, name="train_loader")
    call = (
        (lambda: sharding.gather({}, []))
        if what == "gather"
        else lambda: sharding.merge_top({}, 1, [0])
    )
    with pytest.raises(ValueError, match="^train_loader yielded no batches$"):
        call()
