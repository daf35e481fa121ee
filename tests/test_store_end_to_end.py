"""The feature store end to end, through the estimator: resume after interruption, reuse across
query sets, recompute of a corrupt block, refusal of stale features, two writer processes, and the
identity one process writes, pinned."""

from __future__ import annotations

import hashlib
import multiprocessing
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    SEQ,
    VOCAB,
    DiesAfter,
    run_influence,
    save_checkpoint,
    sketched,
    tiny_model,
)
from store_helpers import full_disk_at, span
from tqdm.auto import tqdm

import sdi
import sdi.passes
from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.fingerprints import loss_fn_fingerprint, model_fingerprint
from sdi.store import (
    CorruptShardError,
    StoreError,
    StoreMismatchError,
    StoreWarning,
    StoreWriteError,
    batch_fingerprint,
    describe,
)
from sdi.toy import next_token_loss, random_token_batches


def _flip_bit(folder: Path, i: int) -> None:
    path, offset, _ = span(folder, i)
    data = bytearray(path.read_bytes())
    data[offset + 9] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(folder: Path, i: int) -> None:
    path, offset, n = span(folder, i)
    path.write_bytes(path.read_bytes()[: offset + n // 2])


def _garbage(folder: Path, i: int) -> None:
    path, offset, n = span(folder, i)
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(range(256)) * (n // 256) + bytes(n % 256)
    path.write_bytes(bytes(data))


def _batch():
    return {"tokens": torch.arange(12).reshape(3, 4), "meta": [1, 2.5, "a"]}


# -- end to end: the estimator ---------------------------------------------------------------------


def _est():
    model = tiny_model()
    return ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=48, seed=5)


def _train(n: int = 7, batch_size: int = 3):
    return random_token_batches(n, batch_size, SEQ, VOCAB, seed=11)


def _query():
    return random_token_batches(4, 4, SEQ, VOCAB, seed=12)


def _run(est, ckpt, train, store, loss_fn=next_token_loss):
    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(str(ckpt), weight=1.0)],
        train_loader=train,
        query_loader=_query(),
        loss_fn=loss_fn,
        train_store=store,
    )


def _count_forwards(est, calls: list, sleep_s: float = 0.0) -> None:
    """Append each forward's batch size to ``calls`` (after ``sleep_s``), by a hook on the model:
    a wrapping loss_fn would be another loss_fn to the store, which refuses it."""

    def hook(module, args):
        time.sleep(sleep_s)
        calls.append(int(args[0].shape[0]))

    est.model.register_forward_pre_hook(hook)


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ck.pt", tiny_model())


def _only_folder(store: Path) -> Path:
    (folder,) = store.iterdir()
    return folder


def test_estimator_recomputes_a_corrupt_block_of_a_complete_store_with_a_warning(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi
    _run(est, ckpt, _train(), store)
    folder = _only_folder(store)
    _flip_bit(folder, 1)
    calls = []
    _count_forwards(est, calls)
    with pytest.warns(StoreWarning, match="batch 1's block in data_000000.bin.*recomputing"):
        got = _run(est, ckpt, _train(), store)
    assert torch.allclose(got.sdi, want, atol=1e-6)
    assert calls == [4, 3]  # the query batch, then only train batch 1 (rows 3..5)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)
        again = _run(est, ckpt, _train(), store)
    assert calls == [4] and torch.allclose(again.sdi, want, atol=1e-6)


def test_estimator_names_a_corrupt_block_whose_batch_the_loader_lacks(tmp_path, ckpt, monkeypatch):
    est, store = _est(), tmp_path / "store"
    _run(est, ckpt, _train(), store)
    folder = _only_folder(store)
    _truncate(folder, 2)
    with pytest.raises(StoreMismatchError, match="holds 3 batches, but the train loader yielded 2"):
        _run(est, ckpt, _train()[:2], store)  # checked: a shorter loader is other train data
    other = _train()[:2] + random_token_batches(1, 1, SEQ, VOCAB, seed=99)
    with pytest.raises(StoreMismatchError, match="train batch 2 differs"):
        _run(est, ckpt, other, store)  # not recomputed from another batch
    monkeypatch.setenv("SDI_STORE_TRUST_TRAIN_LOADER", "1")  # the loader is read only to recompute
    with pytest.raises(
        CorruptShardError,
        match="batch 2's block in data_000000.bin is truncated.*not in the train loader",
    ):
        _run(est, ckpt, _train()[:2], store)
    with pytest.raises(StoreMismatchError, match="train batch 2 differs"):
        _run(est, ckpt, other, store)


def test_estimator_recomputes_a_corrupt_block_when_resuming(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        _run(est, ckpt, DiesAfter(_train(), 2, Killed), store)
    folder = _only_folder(store)
    _garbage(folder, 0)
    calls = []
    _count_forwards(est, calls)
    with pytest.warns(StoreWarning, match="batch 0's block .* does not match its checksum"):
        got = _run(est, ckpt, _train(), store)
    assert calls == [4, 3, 1]  # query; batch 0 recomputed; batch 1 read; batch 2 (1 row) new
    assert torch.allclose(got.sdi, want, atol=1e-6)
    assert describe(folder)["complete"] and describe(folder)["batches"] == 3


def test_estimator_refuses_to_resume_with_other_train_batches(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"

    with pytest.raises(KeyboardInterrupt):
        _run(est, ckpt, DiesAfter(_train(), 1, KeyboardInterrupt), store)
    with pytest.raises(StoreMismatchError, match="train batch 0 differs"):
        _run(est, ckpt, _train(batch_size=2), store)  # another batch size
    other = random_token_batches(7, 3, SEQ, VOCAB, seed=99)  # same shapes, other examples
    with pytest.raises(StoreMismatchError, match="train batch 0 differs"):
        _run(est, ckpt, other, store)
    assert torch.allclose(
        _run(est, ckpt, _train(), store).sdi, _run(est, ckpt, _train(), None).sdi, atol=1e-6
    )


def test_estimator_with_an_empty_train_loader_marks_nothing_complete(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    with pytest.raises(StoreError, match="train loader yielded no batches") as err:
        _run(est, ckpt, [], store)
    folder = _only_folder(store)
    assert str(folder) in str(err.value) and not describe(folder)["complete"]
    assert torch.allclose(
        _run(est, ckpt, _train(), store).sdi, _run(est, ckpt, _train(), None).sdi, atol=1e-6
    )


def test_estimator_full_disk_then_rerun_resumes(tmp_path, ckpt, monkeypatch):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi
    full_disk_at(monkeypatch, store, "data_000000.bin", from_offset=1)
    with pytest.raises(StoreWriteError, match="data_000000.bin"):
        _run(est, ckpt, _train(), store)
    monkeypatch.undo()
    calls = []
    _count_forwards(est, calls)
    got = _run(est, ckpt, _train(), store)
    assert calls == [4, 3, 1] and torch.allclose(got.sdi, want, atol=1e-6)  # batch 0 was kept


def _writer(folder: str, ckpt: str, start, out: str) -> None:
    torch.set_num_threads(1)
    calls = []
    est = _est()
    _count_forwards(est, calls, sleep_s=0.02)  # slow enough for the two writers to interleave
    start.wait(60)
    result = _run(est, ckpt, _train(12, 1), Path(folder))
    torch.save({"sdi": result.sdi, "calls": calls, "fingerprint": batch_fingerprint(_batch())}, out)


def test_two_writer_processes_on_one_new_store_both_end_correct(tmp_path, ckpt):
    store = tmp_path / "store"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outs = [str(tmp_path / f"w{k}.pt") for k in range(2)]
    procs = [ctx.Process(target=_writer, args=(str(store), ckpt, start, o)) for o in outs]
    for p in procs:
        p.start()
    want = _run(_est(), ckpt, _train(12, 1), None).sdi
    start.set()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [torch.load(o) for o in outs]
    for r in results:
        assert torch.allclose(r["sdi"], want, atol=1e-6)
        assert r["fingerprint"] == batch_fingerprint(_batch())  # same digest in another process
    folder = _only_folder(store)
    described = describe(folder)
    assert described["complete"] and described["batches"] == 12 and described["rows"] == [1] * 12
    _, offset, n = span(folder, 11)
    assert (folder / "data_000000.bin").stat().st_size == offset + n  # no batch stored twice
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)
        assert torch.allclose(_run(_est(), ckpt, _train(12, 1), store).sdi, want, atol=1e-6)


def test_one_process_store_identity_and_folder_are_pinned(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    sha = hashlib.sha256((tmp_path / "ck.pt").read_bytes()).hexdigest()
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16, seed=3)
    for with_step_matrix, layout in ((False, "summed"), (True, "per_step")):
        est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(path, weight=1.0)],
            train_loader=train_batches,
            query_loader=query_batches,
            loss_fn=next_token_loss,
            with_step_matrix=with_step_matrix,
            train_store=tmp_path / "store",
        )
        described = describe(tmp_path / "store" / f"{sha[:16]}-{layout}")
        names = [f"core.{name}" for name, _ in model.core.named_parameters()]
        assert described["identity"] == {
            "format": 4,
            "model": model_fingerprint(model),
            "loss_fn": loss_fn_fingerprint(next_token_loss),
            "featurizer": {
                "loss_reduction": "sum",
                "batch_first": True,
                "allow_mixed_steps": False,
            },
            "estimator": "projected",
            "seed": 3,
            "projection_size": 16,
            "params": names,
            "widths": [16] * len(names),
            "checkpoint": {"sha256": sha},
            "layout": layout,
            "dtype": "float32",
            "sdi_version": sdi.__version__,
        }
        assert described["complete"] and described["rows"] == [3, 3, 1]


def test_store_resumes_after_interruption_and_serves_other_query_sets(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    store = tmp_path / "store"
    est = sketched(model)
    want = run_influence(est, path, train_batches, query_batches)

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        run_influence(
            est, path, DiesAfter(train_batches, 2, Killed), query_batches, train_store=store
        )
    (folder,) = store.iterdir()
    described = describe(folder)
    assert len(described["rows"]) == 2 and not described["complete"]

    calls = []
    _count_forwards(est, calls)
    resumed = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=query_batches,
        loss_fn=next_token_loss,
        train_store=store,
    )
    torch.testing.assert_close(resumed.sdi, want.sdi)
    assert calls == [4, 1]  # the query batch, then only the train batch not stored yet
    assert describe(folder)["complete"]

    calls.clear()
    other_query = random_token_batches(2, 2, 7, 19, seed=9)
    reused = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=other_query,
        loss_fn=next_token_loss,
        train_store=store,
    )
    assert calls == [2]  # train features came from disk
    torch.testing.assert_close(reused.sdi, run_influence(est, path, train_batches, other_query).sdi)


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
    run_influence(sketched(model), path, train_batches, query_batches, train_store=tmp_path / "s")
    model2 = tiny_model()  # same weights, fresh hooks
    with pytest.raises(ValueError, match="written for other settings"):
        run_influence(other(model2), path, train_batches, query_batches, train_store=tmp_path / "s")


def test_store_refuses_another_checkpoint_with_the_same_name(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = sketched(model)
    first = run_influence(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    save_checkpoint(
        tmp_path / "ck.pt", tiny_model(seed=3)
    )  # overwritten: new content, new store folder
    second = run_influence(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    assert len(list((tmp_path / "s").iterdir())) == 2
    assert not torch.allclose(first.sdi, second.sdi)


# -- what a complete store's identity covers (issue 13, point 2) ----------------------------------


def test_a_complete_store_refuses_other_train_examples_with_the_same_shapes(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    _run(est, ckpt, _train(), store)
    other = random_token_batches(7, 3, SEQ, VOCAB, seed=99)  # same shapes, other examples
    with pytest.raises(StoreMismatchError, match="train batch 0 differs"):
        _run(est, ckpt, other, store)
    last_changed = _train()[:2] + random_token_batches(1, 1, SEQ, VOCAB, seed=98)
    with pytest.raises(StoreMismatchError, match="train batch 2 differs"):
        _run(est, ckpt, last_changed, store)


def test_a_complete_store_refuses_a_loader_that_grew_or_shrank(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    train = _train(12, 2)  # 6 batches
    want = _run(est, ckpt, train, None).sdi
    _run(est, ckpt, train, store)
    calls = []
    _count_forwards(est, calls)
    grown = train + random_token_batches(12, 2, SEQ, VOCAB, seed=98)  # 12 -> 24 examples
    with pytest.raises(StoreMismatchError, match="holds 6 train batches, .* yields at least 7"):
        _run(est, ckpt, grown, store)
    assert calls == [4]  # the query batch: the extra train batch was refused before featurising
    with pytest.raises(StoreMismatchError, match="holds 6 batches, but the train loader yielded 3"):
        _run(est, ckpt, train[:3], store)  # 12 -> 6 examples
    assert torch.allclose(_run(est, ckpt, train, store).sdi, want, atol=1e-6)  # the store is intact


def _halved_loss(model, batch):
    return 0.5 * next_token_loss(model, batch)


def test_a_complete_store_refuses_another_loss_fn_and_names_it(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    _run(est, ckpt, _train(), store)
    with pytest.raises(StoreMismatchError, match="written for other settings: loss_fn: stored"):
        _run(est, ckpt, _train(), store, loss_fn=_halved_loss)


def test_a_complete_store_refuses_a_model_with_another_loop_count(tmp_path, ckpt):
    store = tmp_path / "store"
    _run(_est(), ckpt, _train(), store)
    model = tiny_model(steps=4)  # the same parameters (the checkpoint loads), one step more
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=48, seed=5)
    with pytest.raises(StoreMismatchError, match="written for other settings: model: stored"):
        _run(est, ckpt, _train(), store)
    with_matrix = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(str(ckpt), weight=1.0)],
        train_loader=_train(),
        query_loader=_query(),
        loss_fn=next_token_loss,
        with_step_matrix=True,
        train_store=tmp_path / "store4",
    )
    assert with_matrix.sdi_matrix.shape == (7, 4, 4, 4)


def test_a_store_refuses_other_featurizer_settings(tmp_path, ckpt):
    store = tmp_path / "store"
    _run(_est(), ckpt, _train(), store)
    model = tiny_model()
    est = ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=48, seed=5, loss_reduction="mean"
    )
    with pytest.raises(StoreMismatchError, match="featurizer: stored .*'loss_reduction': 'sum'"):
        _run(est, ckpt, _train(), store)


def test_a_checkpoint_folder_with_changed_files_gets_its_own_store(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    save_checkpoint(folder / "weights.pt", tiny_model(seed=1))
    (folder / "trainer_state.json").write_text("{}")

    def run(est, store):
        return est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(str(folder), weight=1.0)],
            train_loader=_train(),
            query_loader=_query(),
            loss_fn=next_token_loss,
            load_checkpoint_fn=lambda path: torch.load(Path(path) / "weights.pt"),
            train_store=store,
        )

    est, store = _est(), tmp_path / "store"
    first = run(est, store)
    save_checkpoint(folder / "weights.pt", tiny_model(seed=2))  # same folder name, new weights
    second = run(est, store)
    assert len(list(store.iterdir())) == 2  # identified by its files' content, not its name
    assert torch.allclose(second.sdi, run(est, None).sdi, atol=1e-6)
    assert not torch.allclose(first.sdi, second.sdi)


class _CountingLoader(list):
    """A list of batches that counts how often it is iterated."""

    iterations = 0

    def __iter__(self):
        self.iterations += 1
        return super().__iter__()


def test_trusting_the_loader_skips_reading_it_and_is_unsafe(tmp_path, ckpt, monkeypatch):
    est, store = _est(), tmp_path / "store"
    stored = _run(est, ckpt, _train(), store).sdi
    checked = _CountingLoader(_train())
    _run(est, ckpt, checked, store)
    assert checked.iterations == 1  # by default a complete store reads and hashes the loader
    monkeypatch.setenv("SDI_STORE_TRUST_TRAIN_LOADER", "1")
    trusted = _CountingLoader(random_token_batches(7, 3, SEQ, VOCAB, seed=99))  # other examples
    served = _run(est, ckpt, trusted, store).sdi
    assert trusted.iterations == 0
    assert torch.equal(served, stored)  # stale features: why the opt-out is documented as unsafe


def test_the_train_bar_counts_every_batch_and_shows_rows_served_and_stored(
    tmp_path, ckpt, monkeypatch
):
    est, store = _est(), tmp_path / "store"

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        _run(est, ckpt, DiesAfter(_train(), 2, Killed), store)
    bars = []

    class Bar(tqdm):  # records what the train bar is told
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.name, self.updates, self.postfixes = kwargs.get("desc"), 0, []
            bars.append(self)

        def update(self, n=1):
            self.updates += n
            return super().update(n)

        def set_postfix(self, **kwargs):
            self.postfixes.append({k: v for k, v in kwargs.items() if k != "refresh"})
            return super().set_postfix(**kwargs)

    monkeypatch.setattr(sdi.passes, "tqdm", Bar)
    _run(est, ckpt, _train(), store)
    (train_bar,) = [b for b in bars if b.name == "train batches"]
    # 7 examples in batches of 3: two batches (6 rows) read back, the last one (1 row) computed
    assert train_bar.updates == 3
    assert train_bar.postfixes == [
        {"served_rows": 3, "stored_rows": 0},
        {"served_rows": 6, "stored_rows": 0},
        {"served_rows": 6, "stored_rows": 1},
    ]
