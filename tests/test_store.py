"""The feature store's parts: verified reads, bad blocks and catalogues, full disks, identity, formats.

Faults are injected by writing into the store's files (and its SQLite catalogue) as a crash, a
disk or a user would. Crashes and concurrent writer processes: tests/test_store_crash.py; the
estimator end to end: tests/test_store_end_to_end.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from store_helpers import (
    BLOCK,
    IDENTITY,
    ROWS,
    WIDTH,
    edit_bytes,
    features,
    filled,
    full_disk_at,
    span,
    sql,
)

from sdi.store import (
    CorruptBlockError,
    CorruptCatalogueError,
    CorruptManifestError,
    CorruptShardError,
    FeatureStore,
    OldStoreFormatError,
    StoreError,
    StoreMismatchError,
    StoreWarning,
    StoreWriteError,
    batch_fingerprint,
    describe,
    read_or_compute,
)

# -- round trip, packing, roll-over ----------------------------------------------------------------


def test_round_trip_is_bitwise_and_the_catalogue_records_every_batch(tmp_path):
    store = filled(tmp_path / "s")
    assert store.complete and store.batches == 3 and store.stored == 3
    for i in range(3):
        assert torch.equal(store.read(i), features(i))
    path, offset, nbytes = span(tmp_path / "s", 1)
    assert path.name == "data_000000.bin" and (offset, nbytes) == (BLOCK, BLOCK)  # packed
    data = path.read_bytes()[offset : offset + nbytes]
    assert np.array_equal(np.frombuffer(data, "<f4").reshape(ROWS, WIDTH), features(1).numpy())
    ((rows, shape, dtype, checksum, fingerprint),) = sql(
        tmp_path / "s", "SELECT rows, shape, dtype, checksum, fingerprint FROM batches WHERE idx=1"
    )
    assert (rows, json.loads(shape), dtype, fingerprint) == (ROWS, [ROWS, WIDTH], "<f4", "fp1")
    assert checksum == xxhash.xxh3_128_hexdigest(data, seed=1)
    assert sorted(p.name for p in (tmp_path / "s").glob("data_*")) == ["data_000000.bin"]


def test_data_files_roll_over_at_their_size_limit(tmp_path):
    store = filled(tmp_path / "s", n=7, file_bytes=2 * BLOCK)
    assert sorted(p.name for p in (tmp_path / "s").glob("data_*")) == [
        f"data_{k:06d}.bin" for k in range(4)
    ]
    assert [span(tmp_path / "s", i)[0].name[-5] for i in range(7)] == list("0011223")
    assert all(torch.equal(store.read(i), features(i)) for i in range(7))
    big = FeatureStore(tmp_path / "b", IDENTITY, file_bytes=BLOCK // 2)  # a block over the limit
    big.append(features(0), steps=1)
    big.append(features(1), steps=1)
    assert [span(tmp_path / "b", i)[0].name for i in range(2)] == [
        "data_000000.bin",
        "data_000001.bin",
    ]


def test_bytes_past_the_last_cataloged_block_are_ignored_then_cut_off(tmp_path):
    filled(tmp_path / "s", complete=False).close()
    path = tmp_path / "s" / "data_000000.bin"
    with open(path, "ab") as f:  # what writers killed between their bytes and commit leave
        f.write(os.urandom(3 * BLOCK))
    store = FeatureStore(tmp_path / "s", IDENTITY)
    assert store.stored == 3 and all(torch.equal(store.read(i), features(i)) for i in range(3))
    store.append(features(3), steps=3)
    assert path.stat().st_size == 4 * BLOCK and torch.equal(store.read(3), features(3))


def test_progress_log_lines_say_rows_stored_and_served(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sdi.store")
    batches = [torch.full((ROWS,), float(i)) for i in range(3)]
    with FeatureStore(tmp_path / "s", IDENTITY) as store:
        for i in range(2):
            store.append(features(i), steps=3, fingerprint=batch_fingerprint(batches[i]))
    store = FeatureStore(tmp_path / "s", IDENTITY)
    counts = []
    out = list(
        read_or_compute(
            store,
            batches,
            lambda b: (features(int(b[0])), 3),
            "cpu",
            allow_empty=False,
            on_rows=lambda c: counts.append((c.served_rows, c.stored_rows)),
        )
    )
    assert len(out) == 3 and counts == [(ROWS, 0), (2 * ROWS, 0), (2 * ROWS, ROWS)]
    text = caplog.text
    assert "2 batches stored" in text  # the open
    assert f"served {2 * ROWS} rows (2 batches) from the store" in text
    assert f"computed and stored {ROWS} rows (1 batches)" in text and "holds 3 batches" in text


# -- bad blocks ------------------------------------------------------------------------------------


def _flip_bit(root):
    path, offset, _ = span(root, 1)
    data = bytearray(path.read_bytes())
    data[offset + 77] ^= 0x10  # one bit of one float of batch 1
    path.write_bytes(bytes(data))


def _replace_bytes(root):
    path, offset, _ = span(root, 1)
    edit_bytes(path, offset + 300, b"\x00\x00\x80\x7f" * 2)  # two floats become inf


def _copy_other_block(root):
    path, offset, n = span(root, 1)
    edit_bytes(path, offset, path.read_bytes()[:n])  # batch 0's bytes over batch 1's


def _point_at_other_block(root):
    sql(root, "UPDATE batches SET offset=0 WHERE idx=1")  # batch 1's entry now names batch 0's


def _truncate(root):
    path, offset, n = span(root, 1)
    path.write_bytes(path.read_bytes()[: offset + n // 2])


def _empty(root):
    span(root, 0)[0].write_bytes(b"")


def _garbage(root):
    path = span(root, 0)[0]
    path.write_bytes(os.urandom(path.stat().st_size))


def _delete(root):
    span(root, 0)[0].unlink()


def _catalogue_rows(root):
    sql(root, "UPDATE batches SET rows=? WHERE idx=1", (ROWS + 1,))


def _catalogue_shape(root):
    sql(root, "UPDATE batches SET shape=? WHERE idx=1", (json.dumps([ROWS, WIDTH + 1]),))


def _catalogue_dtype(root):
    sql(root, "UPDATE batches SET dtype='<f8' WHERE idx=1")


FAULTS = {  # injection, what the error says, the batches it breaks
    "flipped_bit": (_flip_bit, "does not match its checksum", {1}),
    "replaced_bytes": (_replace_bytes, "does not match its checksum", {1}),
    "copied_over": (_copy_other_block, "does not match its checksum", {1}),
    "pointed_elsewhere": (_point_at_other_block, "does not match its checksum", {1}),
    "truncated": (_truncate, "is truncated: data_000000.bin has 1200 bytes", {1, 2}),
    "empty": (_empty, "data_000000.bin is empty", {0, 1, 2}),
    "garbage": (_garbage, "does not match its checksum", {0, 1, 2}),
    "missing": (_delete, "data_000000.bin is missing", {0, 1, 2}),
    "catalogue_rows": (_catalogue_rows, f"catalogue says {ROWS + 1} rows", {1}),
    "catalogue_shape": (_catalogue_shape, f"of shape \\({ROWS}, {WIDTH + 1}\\) float32", {1}),
    "catalogue_dtype": (_catalogue_dtype, "has dtype '<f8' in the catalogue", {1}),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_block_is_never_served_and_its_error_names_the_file_and_batch(tmp_path, fault):
    inject, what, broken = FAULTS[fault]
    root = tmp_path / "s"
    filled(root).close()
    inject(root)
    store = FeatureStore(root, IDENTITY)
    for i in sorted({0, 1, 2} - broken):
        assert torch.equal(store.read(i), features(i))
    first = min(broken)
    with pytest.raises(CorruptShardError, match=what) as err:
        store.read(first)
    assert err.value.file == "data_000000.bin" and err.value.batch == first
    assert err.value.store == root and str(root) in str(err.value)
    assert f"batch {first}'s block in data_000000.bin" in str(err.value)
    assert CorruptBlockError is CorruptShardError

    # The batch is not available to the caller: the error says so, with the fix.
    with pytest.raises(CorruptShardError, match="not in the train loader") as err:
        store.read(first, recompute=lambda: None)
    assert "delete the folder" in str(err.value)

    # It is: recomputed with a warning, stored anew, and served verified from then on.
    for i in sorted(broken):
        with pytest.warns(StoreWarning, match=f"batch {i}'s block in data_000000.bin"):
            got = store.read(i, recompute=lambda i=i: (features(i), 3))
        assert torch.equal(got, features(i))
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = FeatureStore(root, IDENTITY)
        assert all(torch.equal(again.read(i), features(i)) for i in range(3))


def test_a_block_another_writer_repaired_is_read_after_a_catalogue_refresh(tmp_path):
    root = tmp_path / "s"
    stale = filled(root)
    assert torch.equal(stale.read(1), features(1))  # its entry is now cached
    _flip_bit(root)
    FeatureStore(root, IDENTITY).replace(1, features(7), steps=3)  # another process's repair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompute, no warning: the entry was only stale
        assert torch.equal(stale.read(1, recompute=lambda: None), features(7))
    assert sql(root, "SELECT fingerprint FROM batches WHERE idx=1") == [("fp1",)]  # kept


# -- bad catalogues --------------------------------------------------------------------------------


def _write_catalogue(content):
    return lambda root: (root / "catalogue.sqlite").write_bytes(content(root))


def _half(root):
    data = (root / "catalogue.sqlite").read_bytes()
    return data[: len(data) // 2]


CATALOGUE_FAULTS = {
    "empty": (_write_catalogue(lambda r: b""), "is empty"),
    "truncated": (_write_catalogue(_half), "cannot be read|quick_check|lacks|has table"),
    "garbage": (_write_catalogue(lambda r: os.urandom(8192)), "cannot be read"),
    "text": (_write_catalogue(lambda r: b'{"shards": []}'), "cannot be read"),
    "missing": (lambda root: (root / "catalogue.sqlite").unlink(), "is missing, but the folder"),
    "no_batches_table": (lambda root: sql(root, "DROP TABLE batches"), "has table 'batches'"),
    "no_complete": (
        lambda root: sql(root, "DELETE FROM meta WHERE key='complete'"),
        "lacks the meta key\\(s\\) 'complete'",
    ),
    "meta_not_json": (
        lambda root: sql(root, "UPDATE meta SET value='{x' WHERE key='batches'"),
        "meta value 'batches' that is not JSON",
    ),
    "bad_file_name": (
        lambda root: sql(root, "UPDATE batches SET file='../x.npy' WHERE idx=0"),
        "bad row for batch 0: file '../x.npy' is not a data file name",
    ),
    "bad_shape": (
        lambda root: sql(root, "UPDATE batches SET shape='[4,' WHERE idx=2"),
        "bad row for batch 2: shape",
    ),
    "bad_type": (
        lambda root: sql(root, "UPDATE batches SET offset='zero' WHERE idx=2"),
        "bad row for batch 2: 'offset' is 'zero'",
    ),
    "a_batch_deleted": (
        lambda root: sql(root, "DELETE FROM batches WHERE idx=1"),
        "lists 2 batches, but their indices run to 2",
    ),
    "batches_disagree": (
        lambda root: sql(root, "UPDATE meta SET value='5' WHERE key='batches'"),
        "marked complete with 5 batches but lists 3",
    ),
}


@pytest.mark.parametrize("fault", CATALOGUE_FAULTS)
def test_a_bad_catalogue_is_an_error_naming_the_store_the_file_and_the_fix(tmp_path, fault):
    inject, what = CATALOGUE_FAULTS[fault]
    root = tmp_path / "s"
    filled(root).close()
    inject(root)
    with pytest.raises(CorruptCatalogueError, match=what) as err:
        store = FeatureStore(root, IDENTITY)
        store.read(0)  # a bad row is found when read
    assert (
        type(err.value) is CorruptCatalogueError and CorruptManifestError is CorruptCatalogueError
    )
    message = str(err.value)
    assert str(root) in message and "catalogue.sqlite" in message
    assert f"delete the folder {root}" in message


def test_other_settings_are_refused_with_the_difference_and_the_fix(tmp_path):
    filled(tmp_path / "s").close()
    with pytest.raises(
        StoreMismatchError, match="written for other settings: seed: stored 1, now 2"
    ):
        FeatureStore(tmp_path / "s", {**IDENTITY, "seed": 2})


# -- older formats ---------------------------------------------------------------------------------


def _format_3_store(root: Path) -> None:
    """A folder as sdi wrote it before the catalogue: manifest.json and one .npy per batch."""
    root.mkdir(parents=True)
    np.save(root / "shard_000000.npy", features(0).numpy())
    manifest = {"identity": {"format": 3, **IDENTITY}, "shards": [], "complete": False}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / ".lock").write_bytes(b"")


def test_a_store_in_the_previous_format_is_refused_with_how_to_rebuild_it(tmp_path):
    _format_3_store(tmp_path / "s")
    with pytest.raises(OldStoreFormatError, match="store format 3") as err:
        FeatureStore(tmp_path / "s", IDENTITY)
    message = str(err.value)
    assert f"to rebuild it, delete the folder {tmp_path / 's'}" in message
    assert "recomputed on the next run" in message and isinstance(err.value, StoreMismatchError)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        ".lock",
        "manifest.json",
        "shard_000000.npy",
    ]  # nothing written into it


def test_a_catalogue_of_another_format_number_is_refused(tmp_path):
    filled(tmp_path / "s").close()
    sql(tmp_path / "s", "UPDATE meta SET value='5' WHERE key='format'")
    with pytest.raises(OldStoreFormatError, match="store format 5, which this version"):
        FeatureStore(tmp_path / "s", IDENTITY)


# -- completeness, batch count, fingerprints -------------------------------------------------------


def test_a_store_without_batches_is_never_marked_complete(tmp_path):
    store = FeatureStore(tmp_path / "s", IDENTITY)
    with pytest.raises(StoreError, match="yielded no batches") as err:
        store.finish(0)
    assert str(tmp_path / "s") in str(err.value)
    assert not describe(tmp_path / "s")["complete"] and not store.complete
    store.finish(0, allow_empty=True)  # a rank that owns no batch
    assert FeatureStore(tmp_path / "s", IDENTITY).complete


def test_the_number_of_batches_is_recorded_and_checked(tmp_path):
    store = filled(tmp_path / "s", complete=False)
    with pytest.raises(StoreMismatchError, match="holds 3 batches, but the train loader yielded 2"):
        store.finish(2)
    store.finish(3)
    assert describe(tmp_path / "s")["batches"] == 3
    store.check_batches(3)
    with pytest.raises(
        StoreMismatchError, match="holds 3 train batches, but the train loader yields 4"
    ):
        store.check_batches(4)
    with pytest.raises(StoreMismatchError, match="complete with 3 train batches"):
        store.append(features(3), steps=3)


def test_fingerprints_are_stored_and_a_different_batch_is_named(tmp_path):
    store = filled(tmp_path / "s")
    store.check_fingerprint(1, "fp1")
    with pytest.raises(StoreMismatchError, match="train batch 1 differs") as err:
        store.check_fingerprint(1, "other")
    assert "data_000000.bin" in str(err.value) and str(tmp_path / "s") in str(err.value)


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


def test_batch_fingerprint_is_deterministic_and_ignores_key_order():
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


def test_a_full_disk_for_a_data_file_names_the_file_and_bytes_then_the_rerun_resumes(
    tmp_path, monkeypatch
):
    root = tmp_path / "s"
    store = filled(root, n=2, complete=False)
    full_disk_at(monkeypatch, root, "data_000000.bin")
    with pytest.raises(StoreWriteError) as err:
        store.append(features(2), steps=3, fingerprint="fp2")
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and str(root) in message
    assert err.value.file == "data_000000.bin" and err.value.needed == BLOCK
    assert f"{BLOCK} bytes needed" in message and "bytes free on its disk" in message
    assert "Free space" in message and "resumes after its last complete batch" in message
    assert (root / "data_000000.bin").stat().st_size == 2 * BLOCK  # no half block left
    assert describe(root)["rows"] == [ROWS, ROWS]  # nothing cataloged
    _resumes(root, store)


def test_a_full_disk_for_the_catalogue_names_it_then_the_rerun_resumes(tmp_path):
    root = tmp_path / "s"
    store = filled(root, n=2, complete=False)
    (pages,) = store._catalogue.db.execute("PRAGMA page_count").fetchone()
    store._catalogue.db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite: the disk is full
    with pytest.raises(StoreWriteError) as err:
        for i in range(2, 400):  # until a row needs a page more
            store.append(features(i), steps=3, fingerprint=f"fp{i}")
    assert err.value.errno == errno.ENOSPC and err.value.file == "catalogue.sqlite"
    assert "bytes needed" in str(err.value) and "catalogue.sqlite" in str(err.value)
    stored = len(describe(root)["rows"])
    assert 2 <= stored < 400 and store.stored == stored  # the failed batch is not cataloged
    _resumes(root, store, start=stored)


def _resumes(root, old, start: int = 2) -> None:
    old.close()
    resumed = FeatureStore(root, IDENTITY)
    assert resumed.stored == start
    resumed.append(features(start), steps=3, fingerprint=f"fp{start}")
    resumed.finish(start + 1)
    resumed.close()
    again = FeatureStore(root, IDENTITY)
    assert all(torch.equal(again.read(i), features(i)) for i in range(start + 1))


# -- two writers in one process --------------------------------------------------------------------


def test_a_writer_adopts_the_batch_another_stored_first(tmp_path):
    a = FeatureStore(tmp_path / "s", IDENTITY)
    b = FeatureStore(tmp_path / "s", IDENTITY)
    a.append(features(0), steps=3, fingerprint="fp0")
    b.append(features(0), steps=3, fingerprint="fp0")  # computed the same batch meanwhile
    assert b.stored == 1 and b.entry(0) == a.entry(0)
    assert (tmp_path / "s" / "data_000000.bin").stat().st_size == BLOCK  # not stored twice
    a.append(features(1), steps=3, fingerprint="fp1")
    with pytest.raises(
        StoreMismatchError, match="another process stored a different train batch 1"
    ):
        b.append(features(9), steps=3, fingerprint="fp9")
    a.finish(2)
    b.finish(2)  # already complete: checked, not rewritten
    assert describe(tmp_path / "s")["batches"] == 2


def test_errors_survive_pickling_across_processes(tmp_path):
    errors = [
        CorruptShardError(tmp_path, "data_000001.bin", "is truncated", 7),
        CorruptCatalogueError(tmp_path, "catalogue.sqlite", "is empty"),
        StoreMismatchError(tmp_path, "other"),
        OldStoreFormatError(tmp_path, "format 3"),
        StoreWriteError(tmp_path, "data_000000.bin", 928, OSError(errno.ENOSPC, "No space")),
    ]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.store == err.store
    assert pickle.loads(pickle.dumps(errors[0])).batch == 7
    assert pickle.loads(pickle.dumps(errors[-1])).errno == errno.ENOSPC
