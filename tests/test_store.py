"""The feature store: verified reads, bad shards and manifests, full disks, concurrent writers, identity.

Also, end to end: resume after interruption, reuse across query sets, refusal of stale features,
and the identity one process writes, pinned. Faults are injected by writing into the store's files as a crash, a disk or a user would; the
estimator is run end to end (the toy model) for the recompute and two-writer cases.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
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

import sdi
from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.fingerprints import loss_fn_fingerprint, model_fingerprint
from sdi.store import (
    CorruptManifestError,
    CorruptShardError,
    FeatureStore,
    StoreError,
    StoreMismatchError,
    StoreWarning,
    StoreWriteError,
    batch_fingerprint,
)
from sdi.toy import next_token_loss, random_token_batches

IDENTITY = {"kind": "test", "seed": 1}
ROWS, WIDTH = 4, 50  # 800 data bytes per shard: a cut at half the file keeps the 128-byte header


def _features(i: int, rows: int = ROWS) -> torch.Tensor:
    return torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(100 + i))


def _filled(root: Path, n: int = 3, complete: bool = True) -> FeatureStore:
    store = FeatureStore(root, IDENTITY)
    for i in range(n):
        store.append(_features(i), steps=3, fingerprint=f"fp{i}")
    if complete:
        store.finish(n)
    return store


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _edit_manifest(root: Path, change) -> None:
    manifest = _manifest(root)
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_is_bitwise_and_records_checksums_and_batches(tmp_path):
    _filled(tmp_path / "s")
    store = FeatureStore(tmp_path / "s", IDENTITY)  # reopened: everything from disk
    assert store.complete and store.batches == 3 and len(store.shards) == 3
    for i in range(3):
        assert torch.equal(store.read(i), _features(i))
    entry = _manifest(tmp_path / "s")["shards"][1]
    data = (tmp_path / "s" / "shard_000001.npy").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    assert (
        entry["shape"] == [ROWS, WIDTH] and entry["rows"] == ROWS and entry["fingerprint"] == "fp1"
    )


# -- bad shards ------------------------------------------------------------------------------------


def _flip_bit(path: Path, root: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # one bit of one float
    path.write_bytes(bytes(data))


def _replace_bytes(path: Path, root: Path) -> None:
    data = bytearray(path.read_bytes())
    data[300:308] = b"\x00\x00\x80\x7f" * 2  # two floats become inf
    path.write_bytes(bytes(data))


def _copy_other_shard(path: Path, root: Path) -> None:
    path.write_bytes((root / "shard_000000.npy").read_bytes())  # same shape, other features


def _truncate(path: Path, root: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path, root: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path, root: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _fewer_rows(path: Path, root: Path) -> None:
    np.save(path, np.load(path)[:-1])  # a valid .npy that lost its last row


def _manifest_rows(path: Path, root: Path) -> None:
    _edit_manifest(root, lambda m: m["shards"][1].update(rows=ROWS + 1))


def _delete(path: Path, root: Path) -> None:
    path.unlink()


FAULTS = {
    "flipped_bit": (_flip_bit, "SHA-256"),
    "replaced_bytes": (_replace_bytes, "SHA-256"),
    "copied_over": (_copy_other_shard, "SHA-256"),
    "truncated": (_truncate, "is truncated"),
    "empty": (_empty, "is empty"),
    "garbage": (_garbage, "is not a .npy file"),
    "fewer_rows": (_fewer_rows, f"holds {ROWS - 1} rows, the manifest says {ROWS}"),
    "manifest_rows": (_manifest_rows, f"holds {ROWS} rows, the manifest says {ROWS + 1}"),
    "missing": (_delete, "is missing"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_shard_is_never_served_and_its_error_names_the_file(tmp_path, fault):
    inject, what = FAULTS[fault]
    root = tmp_path / "s"
    _filled(root)
    inject(root / "shard_000001.npy", root)
    store = FeatureStore(root, IDENTITY)
    assert torch.equal(store.read(0), _features(0)) and torch.equal(store.read(2), _features(2))
    with pytest.raises(CorruptShardError, match=what) as err:
        store.read(1)
    assert err.value.file == "shard_000001.npy" and err.value.store == root
    assert "shard_000001.npy" in str(err.value) and str(root) in str(err.value)

    # The batch is not available to the caller: the error says so, with the fix.
    with pytest.raises(CorruptShardError, match="not in the train loader") as err:
        store.read(1, recompute=lambda: None)
    assert "delete the folder" in str(err.value) and "shard_000001.npy" in str(err.value)

    # It is: recomputed with a warning, rewritten, and served verified from then on.
    with pytest.warns(StoreWarning, match="shard_000001.npy"):
        got = store.read(1, recompute=lambda: (_features(1), 3))
    assert torch.equal(got, _features(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(FeatureStore(root, IDENTITY).read(1), _features(1))


def test_a_shard_rewritten_by_another_writer_is_read_after_a_manifest_refresh(tmp_path):
    root = tmp_path / "s"
    stale = _filled(root)
    FeatureStore(root, IDENTITY).replace(1, _features(7), steps=3)  # another process's repair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompute, no warning: the entry was only stale
        assert torch.equal(stale.read(1, recompute=lambda: None), _features(7))
    assert _manifest(root)["shards"][1]["fingerprint"] == "fp1"  # kept by the repair


# -- bad manifests ---------------------------------------------------------------------------------


def _text(content: bytes):
    return lambda root: (root / "manifest.json").write_bytes(content)


def _cut_manifest(root: Path) -> None:
    text = (root / "manifest.json").read_bytes()
    (root / "manifest.json").write_bytes(text[: len(text) // 2])


def _drop(key: str):
    return lambda root: _edit_manifest(root, lambda m: m.pop(key))


MANIFEST_FAULTS = {
    "empty": (_text(b""), "is empty"),
    "truncated": (_cut_manifest, "is not valid JSON"),
    "garbage": (_text(b"\xff\xfe\x00\x81garbage"), "is not text"),
    "not_json": (_text(b"shards: 3"), "is not valid JSON"),
    "json_list": (_text(b"[1, 2]"), "holds a JSON list"),
    "no_identity": (_drop("identity"), "lacks the key 'identity'"),
    "no_shards": (_drop("shards"), "lacks the key\\(s\\) 'shards'"),
    "no_complete": (_drop("complete"), "'complete'"),
    "no_batches": (_drop("batches"), "'batches'"),
    "entry_no_checksum": (
        lambda root: _edit_manifest(root, lambda m: m["shards"][2].pop("sha256")),
        "shard 2: lacks the key 'sha256'",
    ),
    "entry_bad_file": (
        lambda root: _edit_manifest(root, lambda m: m["shards"][0].update(file="../x.npy")),
        "is not shard_000000.npy",
    ),
    "complete_without_count": (
        lambda root: _edit_manifest(root, lambda m: m.update(batches=None)),
        "marked complete with None batches but lists 3 shards",
    ),
    "batches_disagree": (
        lambda root: _edit_manifest(root, lambda m: m.update(batches=5)),
        "marked complete with 5 batches but lists 3 shards",
    ),
}


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_a_bad_manifest_is_an_error_naming_the_store_the_file_and_the_fix(tmp_path, fault):
    inject, what = MANIFEST_FAULTS[fault]
    root = tmp_path / "s"
    _filled(root)
    inject(root)
    with pytest.raises(CorruptManifestError, match=what) as err:
        FeatureStore(root, IDENTITY)
    assert type(err.value) is CorruptManifestError  # not a JSONDecodeError / KeyError
    message = str(err.value)
    assert str(root) in message and "manifest.json" in message
    assert f"delete the folder {root}" in message


def test_other_settings_are_refused_with_the_difference_and_the_fix(tmp_path):
    _filled(tmp_path / "s")
    with pytest.raises(
        StoreMismatchError, match="written for other settings: seed: stored 1, now 2"
    ):
        FeatureStore(tmp_path / "s", {**IDENTITY, "seed": 2})


# -- completeness, batch count, fingerprints ---------------------------------------------------------


def test_a_store_without_shards_is_never_marked_complete(tmp_path):
    store = FeatureStore(tmp_path / "s", IDENTITY)
    with pytest.raises(StoreError, match="yielded no batches") as err:
        store.finish(0)
    assert str(tmp_path / "s") in str(err.value)
    assert not _manifest(tmp_path / "s")["complete"] and not store.complete
    store.finish(0, allow_empty=True)  # a rank that owns no batch
    assert FeatureStore(tmp_path / "s", IDENTITY).complete


def test_the_number_of_batches_is_recorded_and_checked(tmp_path):
    store = _filled(tmp_path / "s", complete=False)
    with pytest.raises(StoreMismatchError, match="holds 3 shards, but the train loader yielded 2"):
        store.finish(2)
    store.finish(3)
    assert _manifest(tmp_path / "s")["batches"] == 3
    store.check_batches(3)
    with pytest.raises(
        StoreMismatchError, match="holds 3 train batches, but the train loader yields 4"
    ):
        store.check_batches(4)
    with pytest.raises(StoreMismatchError, match="complete with 3 train batches"):
        store.append(_features(3), steps=3)


def test_fingerprints_are_stored_and_a_different_batch_is_named(tmp_path):
    store = _filled(tmp_path / "s")
    store.check_fingerprint(1, "fp1")
    with pytest.raises(StoreMismatchError, match="train batch 1 differs") as err:
        store.check_fingerprint(1, "other")
    assert "shard_000001.npy" in str(err.value) and str(tmp_path / "s") in str(err.value)


def _batch(**change):
    batch = {
        "tokens": torch.arange(12).reshape(3, 4),
        "mask": np.ones((3, 4), dtype=bool),
        "meta": [1, 2.5, "a", None, (torch.tensor(0.5),)],
    }
    batch.update(change)
    return batch


@pytest.mark.parametrize(
    "change",
    [
        dict(
            tokens=torch.arange(12)
            .reshape(3, 4)
            .index_put((torch.tensor(2), torch.tensor(3)), torch.tensor(99))
        ),
        dict(tokens=torch.arange(12).reshape(4, 3)),  # shape
        dict(tokens=torch.arange(12, dtype=torch.int32).reshape(3, 4)),  # dtype, same values
        dict(mask=np.ones((3, 4), dtype=np.uint8)),  # numpy dtype
        dict(meta=[1, 2.5, "b", None, (torch.tensor(0.5),)]),  # a string
        dict(meta=[1, 2.5000001, "a", None, (torch.tensor(0.5),)]),  # a float
        dict(meta=[True, 2.5, "a", None, (torch.tensor(0.5),)]),  # True is not 1
        dict(meta=[1, 2.5, "a", None, [torch.tensor(0.5), 0]]),  # nesting
        dict(extra=torch.zeros(1)),  # a key more
    ],
    ids=["value", "shape", "dtype", "np_dtype", "str", "float", "bool", "nesting", "key"],
)
def test_batch_fingerprint_changes_with_any_content(change):
    assert batch_fingerprint(_batch(**change)) != batch_fingerprint(_batch())


def test_batch_fingerprint_is_deterministic_and_ignores_key_order(tmp_path):
    first = batch_fingerprint(_batch())
    assert first == batch_fingerprint(_batch())
    assert first == batch_fingerprint(dict(reversed(list(_batch().items()))))
    renamed = _batch()
    renamed["tokens2"] = renamed.pop("tokens")
    assert batch_fingerprint(renamed) != first
    assert batch_fingerprint(torch.arange(3).float()) != batch_fingerprint(torch.arange(3).double())
    with pytest.raises(TypeError, match="cannot fingerprint a train batch holding a object"):
        batch_fingerprint({"x": object()})


# -- full disk -------------------------------------------------------------------------------------


def _fill_disk_at(monkeypatch, root: Path, name: str):
    """From now on, writes of ``name``'s temporary under ``root`` are short, then ENOSPC."""
    real = os.write

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(root)) and Path(target).name.startswith(f".{name}."):
            if len(data) > 1:
                return real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("name", ["shard_000002.npy", "manifest.json"])
def test_a_full_disk_is_an_error_naming_the_store_and_bytes_then_the_rerun_resumes(
    tmp_path, monkeypatch, name
):
    root = tmp_path / "s"
    store = _filled(root, n=2, complete=False)
    before = _manifest(root)
    _fill_disk_at(monkeypatch, root, name)
    with pytest.raises(StoreWriteError) as err:
        store.append(_features(2), steps=3, fingerprint="fp2")
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and str(root) in message and name in message
    needed = err.value.needed
    if name.startswith("shard"):
        assert needed == 128 + ROWS * WIDTH * 4  # the .npy header and the float32 rows
    else:
        assert needed > 500  # the whole manifest text
    assert f"{needed} bytes needed" in message and "bytes free on its disk" in message
    assert "Free space" in message and "resumes after its last complete shard" in message
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))  # cleaned up
    assert _manifest(root) == before  # the store still lists the two complete shards

    resumed = FeatureStore(root, IDENTITY)
    assert len(resumed.shards) == 2
    resumed.append(_features(2), steps=3, fingerprint="fp2")
    resumed.finish(3)
    for i in range(3):
        assert torch.equal(FeatureStore(root, IDENTITY).read(i), _features(i))


def test_temporaries_left_by_a_killed_writer_are_removed_on_open(tmp_path):
    root = tmp_path / "s"
    _filled(root, complete=False)
    (root / ".shard_000003.npy.abc.tmp").write_bytes(b"half")
    (root / "shard_000003.npy.tmp").write_bytes(b"half")  # format 1's temporary name
    FeatureStore(root, IDENTITY)
    assert sorted(p.name for p in root.iterdir()) == [
        ".lock",
        "manifest.json",
        "shard_000000.npy",
        "shard_000001.npy",
        "shard_000002.npy",
    ]


# -- two writers (one process each, or two objects in one) -------------------------------------------


def test_a_writer_adopts_the_shard_another_wrote_first(tmp_path):
    a = FeatureStore(tmp_path / "s", IDENTITY)
    b = FeatureStore(tmp_path / "s", IDENTITY)
    a.append(_features(0), steps=3, fingerprint="fp0")
    b.append(_features(0), steps=3, fingerprint="fp0")  # computed the same batch meanwhile
    assert len(b.shards) == 1 and b.shards == a.shards
    a.append(_features(1), steps=3, fingerprint="fp1")
    with pytest.raises(
        StoreMismatchError, match="another process stored a different train batch 1"
    ):
        b.append(_features(9), steps=3, fingerprint="fp9")
    a.finish(2)
    b.finish(2)  # already complete: checked, not rewritten
    assert _manifest(tmp_path / "s")["batches"] == 2


def test_a_single_writer_does_not_reparse_its_own_manifest(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "s", IDENTITY)
    loads = []
    real = FeatureStore._load
    monkeypatch.setattr(FeatureStore, "_load", lambda self: loads.append(1) or real(self))
    for i in range(3):
        store.append(_features(i), steps=3)
    store.finish(3)
    assert loads == []  # its view is the file it wrote last (same inode, size and times)
    FeatureStore(tmp_path / "s", IDENTITY).replace(0, _features(5), steps=3)  # another writer
    store.replace(1, _features(6), steps=3)
    assert loads == [1, 1]  # the other writer's open, then this one re-reads the changed file
    assert torch.equal(store.read(0), _features(5)) and torch.equal(store.read(1), _features(6))


def test_errors_survive_pickling_across_processes(tmp_path):
    errors = [
        CorruptShardError(tmp_path, "shard_000001.npy", "is empty (0 bytes)"),
        CorruptManifestError(tmp_path, "manifest.json", "is empty"),
        StoreMismatchError(tmp_path, "other"),
        StoreWriteError(tmp_path, "shard_000000.npy", 928, OSError(errno.ENOSPC, "No space")),
    ]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.store == err.store
    assert pickle.loads(pickle.dumps(errors[-1])).errno == errno.ENOSPC


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


def test_estimator_recomputes_a_corrupt_shard_of_a_complete_store_with_a_warning(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi
    _run(est, ckpt, _train(), store)
    folder = _only_folder(store)
    _flip_bit(folder / "shard_000001.npy", folder)
    calls = []
    _count_forwards(est, calls)
    with pytest.warns(StoreWarning, match="shard_000001.npy.*recomputing"):
        got = _run(est, ckpt, _train(), store)
    assert torch.allclose(got.sdi, want, atol=1e-6)
    assert calls == [4, 3]  # the query batch, then only train batch 1 (rows 3..5)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)
        again = _run(est, ckpt, _train(), store)
    assert calls == [4] and torch.allclose(again.sdi, want, atol=1e-6)


def test_estimator_names_a_corrupt_shard_whose_batch_the_loader_lacks(tmp_path, ckpt, monkeypatch):
    est, store = _est(), tmp_path / "store"
    _run(est, ckpt, _train(), store)
    folder = _only_folder(store)
    _truncate(folder / "shard_000002.npy", folder)
    with pytest.raises(StoreMismatchError, match="holds 3 shards, but the train loader yielded 2"):
        _run(est, ckpt, _train()[:2], store)  # checked: a shorter loader is other train data
    other = _train()[:2] + random_token_batches(1, 1, SEQ, VOCAB, seed=99)
    with pytest.raises(StoreMismatchError, match="train batch 2 differs"):
        _run(est, ckpt, other, store)  # not recomputed from another batch
    monkeypatch.setenv("SDI_STORE_TRUST_TRAIN_LOADER", "1")  # the loader is read only to recompute
    with pytest.raises(
        CorruptShardError, match="shard_000002.npy is truncated.*not in the train loader"
    ):
        _run(est, ckpt, _train()[:2], store)
    with pytest.raises(StoreMismatchError, match="train batch 2 differs"):
        _run(est, ckpt, other, store)


def test_estimator_recomputes_a_corrupt_shard_when_resuming(tmp_path, ckpt):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        _run(est, ckpt, DiesAfter(_train(), 2, Killed), store)
    folder = _only_folder(store)
    _garbage(folder / "shard_000000.npy", folder)
    calls = []
    _count_forwards(est, calls)
    with pytest.warns(StoreWarning, match="shard_000000.npy is not a .npy file"):
        got = _run(est, ckpt, _train(), store)
    assert calls == [4, 3, 1]  # query; batch 0 recomputed; batch 1 read; batch 2 (1 row) new
    assert torch.allclose(got.sdi, want, atol=1e-6)
    assert _manifest(folder)["complete"] and _manifest(folder)["batches"] == 3


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
    assert str(folder) in str(err.value) and not _manifest(folder)["complete"]
    assert torch.allclose(
        _run(est, ckpt, _train(), store).sdi, _run(est, ckpt, _train(), None).sdi, atol=1e-6
    )


def test_estimator_full_disk_then_rerun_resumes(tmp_path, ckpt, monkeypatch):
    est, store = _est(), tmp_path / "store"
    want = _run(est, ckpt, _train(), None).sdi
    _fill_disk_at(monkeypatch, store, "shard_000001.npy")
    with pytest.raises(StoreWriteError, match="shard_000001.npy"):
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
    manifest = _manifest(folder)
    assert manifest["complete"] and manifest["batches"] == 12
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
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
        manifest = json.loads(
            (tmp_path / "store" / f"{sha[:16]}-{layout}" / "manifest.json").read_text()
        )
        names = [f"core.{name}" for name, _ in model.core.named_parameters()]
        assert manifest["identity"] == {
            "format": 3,
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
        assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [3, 3, 1]


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
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]

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
    assert json.loads((folder / "manifest.json").read_text())["complete"]

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
    with pytest.raises(StoreMismatchError, match="holds 6 shards, but the train loader yielded 3"):
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
