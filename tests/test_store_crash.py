"""The feature store under crashes and concurrency, with real processes.

A writer process (tests/store_writer.py) is killed with SIGKILL at random instants while it
appends, several times over; the store is then resumed and must hold, bitwise, what an
uninterrupted run stores, with nothing duplicated and no garbage left. Two writer processes append
the same batches to one store at once and must both end with the same, complete store.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from store_helpers import sql
from store_writer import FILE_BYTES, IDENTITY, crash_features, write

from sdi.store import FeatureStore

FOREVER = 10**9
_FORK = multiprocessing.get_context("fork")  # no torch import per process: the tests start many


def _start(root: Path, last: int, go=None):
    ready = _FORK.Event()
    proc = _FORK.Process(target=write, args=(root, last, ready, go))
    proc.start()
    assert ready.wait(60)
    return proc


def _stored(root: Path) -> int:
    with FeatureStore(root, IDENTITY, file_bytes=FILE_BYTES) as store:
        return store.stored


def _check_complete_and_clean(root: Path, batches: int) -> None:
    """Every batch is bitwise what an uninterrupted writer stores; the data files hold exactly the
    cataloged blocks: nothing stored twice, no garbage left."""
    with FeatureStore(root, IDENTITY, file_bytes=FILE_BYTES) as store:
        assert store.complete and store.batches == batches == store.stored
        for i in range(batches):
            assert torch.equal(store.read(i), crash_features(i)), i
            assert store.entry(i).steps == 1 + i % 3 and store.entry(i).fingerprint == f"fp{i}"
    ((cataloged,),) = sql(root, "SELECT sum(nbytes) FROM batches")
    assert sum(p.stat().st_size for p in root.glob("data_*.bin")) == cataloged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_writer_killed_at_random_instants_resumes_bitwise(tmp_path, seed):
    rng = random.Random(seed)
    root = tmp_path / "s"
    stored = []
    for _ in range(3):  # three kills in a row, each at a random instant of its appends
        proc = _start(root, FOREVER)
        time.sleep(rng.uniform(0.02, 0.5))
        proc.kill()  # SIGKILL
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        stored.append(_stored(root))
    assert stored == sorted(stored) and 0 < stored[-1] < FOREVER  # it was killed mid-run
    last = stored[-1] + 25
    proc = _start(root, last)  # the resume
    proc.join(120)
    assert proc.exitcode == 0
    _check_complete_and_clean(root, last)

    uninterrupted = tmp_path / "u"
    proc = _start(uninterrupted, last)
    proc.join(120)
    with (
        FeatureStore(root, IDENTITY, file_bytes=FILE_BYTES) as a,
        FeatureStore(uninterrupted, IDENTITY, file_bytes=FILE_BYTES) as b,
    ):
        assert all(torch.equal(a.read(i), b.read(i)) for i in range(last))


def test_two_writer_processes_append_to_one_store_at_once(tmp_path):
    root, go, last = tmp_path / "s", _FORK.Event(), 300
    procs = [_start(root, last, go) for _ in range(2)]
    go.set()  # both start appending the same batches at the same instant
    for proc in procs:
        proc.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_complete_and_clean(root, last)
