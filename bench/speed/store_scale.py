"""The feature store at scale, side by side in one run -> bench/results/store_scale.md.

1. Appends: time per batch in windows ending at 1,000, 10,000 and 100,000 batches appended to one
   fresh store (tiny fake features, 32 x 64 float32 = 8 KiB a batch, a 64-hex fingerprint each).
2. Files: how many files the store of 100,000 batches holds, and their sizes.
3. Reads of a complete store from the page cache (CPU cost, not disk speed): the verified read
   (``FeatureStore.read``: catalogue entry, size, XXH3-128) and an unverified read of the same
   bytes (the same catalogue entry, then a copy out of a memory map of the data file) in GB/s, for
   1 MiB batches and for the 8 KiB batches of (1).
4. End to end: ``influence_across_checkpoints(..., train_store=...)`` of a small looped model
   (``sdi.toy``) at ``--n-train`` examples: without a store, writing a fresh store, and reading the
   complete store, with the time split into featurisation, store (appends, verified reads, the
   train batches' fingerprints) and the rest (contraction into the output, loading).

    python bench/speed/store_scale.py [--appends 100000] [--n-train 100000] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm import tqdm

import sdi.store.serve as serve
from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.featurize import Featurizer
from sdi.store import FeatureStore
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches

IDENTITY = {"bench": "store_scale"}


def appends(folder: Path, total: int, windows: list[int]) -> tuple[list[str], FeatureStore]:
    """Append ``total`` tiny batches; the mean time per batch over the last 1,000 before each
    window's end."""
    store = FeatureStore(folder, IDENTITY)
    x, fingerprint = torch.randn(32, 64), "f" * 64
    times = np.empty(total)
    for i in tqdm(range(total), desc="appends", unit="batch", mininterval=5):
        t0 = time.perf_counter()
        store.append(x, steps=1, fingerprint=fingerprint)
        times[i] = time.perf_counter() - t0
    rows, means, medians = [], [], []
    for end in windows:
        if end <= total:
            window = times[end - 1000 : end]
            means.append(window.mean())
            medians.append(np.median(window))
            rows.append(f"| {end:,} | {means[-1] * 1e6:.0f} µs | {medians[-1] * 1e6:.0f} µs |")
    rows.append(
        f"\nflat within {max(means) / min(means):.2f}x by the mean, "
        f"{max(medians) / min(medians):.2f}x by the median (slowest window / fastest)"
    )
    store.finish()
    return rows, store


def files(folder: Path) -> list[str]:
    listing = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    t0 = time.perf_counter()
    FeatureStore(folder, IDENTITY).close()  # the catalogue's checks, quick_check included
    opened = time.perf_counter() - t0
    return [
        f"{len(listing)} files: " + ", ".join(f"`{n}` ({s / 2**20:.1f} MiB)" for n, s in listing),
        "(`-wal` and `-shm` are SQLite's, there while a connection is open; the WAL is folded",
        f"into `catalogue.sqlite` when the last one closes). Opening this store took {opened:.2f} s.",
    ]


def checksums(mib: int = 64) -> list[str]:
    """Each candidate checksum alone over ``mib`` MiB, next to a plain copy of the same bytes."""
    data = np.random.default_rng(0).random(mib << 18, dtype=np.float32).view(np.uint8)
    cases = {
        "copy (np.ndarray.copy)": data.copy,
        "XXH3-128 (the store's)": lambda: xxhash.xxh3_128_hexdigest(data, seed=1),
        "CRC-32 (zlib)": lambda: zlib.crc32(data),
        "SHA-256 (hashlib; format 3's)": lambda: hashlib.sha256(data).hexdigest(),
        "BLAKE2b (hashlib)": lambda: hashlib.blake2b(data).hexdigest(),
    }
    return [
        f"| {name} | {data.nbytes / best_of(3, fn) / 1e9:.2f} GB/s |" for name, fn in cases.items()
    ]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def reads(store: FeatureStore, label: str, repeats: int = 3) -> list[str]:
    """Verified vs unverified read of every batch of a complete store, in GB/s."""
    entries = [store.entry(i) for i in range(store.batches)]
    nbytes = sum(e.nbytes for e in entries)
    maps = {}
    for name in {e.file for e in entries}:
        with open(store.root / name, "rb") as f:
            maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def unverified():  # where each block lies (the catalogue entry), then its bytes: no checks
        for i in range(len(entries)):
            e = store.entry(i)
            data = np.frombuffer(maps[e.file], np.uint8, count=e.nbytes, offset=e.offset).copy()
            torch.from_numpy(data.view(np.float32).reshape(e.shape))

    def verified():
        for i in range(len(entries)):
            store.read(i)

    unverified()  # warm the page cache and the maps
    u, v = best_of(repeats, unverified), best_of(repeats, verified)
    return [
        f"| {label} | {len(entries):,} | {nbytes / 2**20:.0f} MiB | {nbytes / v / 1e9:.2f} GB/s | "
        f"{nbytes / u / 1e9:.2f} GB/s | {v / u:.2f}x |"
    ]


@contextlib.contextmanager
def timed(spent: dict, key: str, owner, name: str):
    """Add the time spent in ``owner.name`` to ``spent[key]`` while the block runs."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def end_to_end(folder: Path, n_train: int) -> list[str]:
    torch.manual_seed(0)
    model = LoopedTransformer(vocab=19, d_model=12, n_heads=2, loop_steps=3, max_len=7).eval()
    checkpoint = folder / "ck.pt"
    torch.save({"model_state_dict": model.state_dict()}, checkpoint)
    train = random_token_batches(n_train, 32, 7, 19, seed=1)
    query = random_token_batches(16, 16, 7, 19, seed=2)
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=48, seed=5)
    rows, results = [], []
    for label, store in (
        ("no store", None),
        ("store, first run (writes)", folder / "store"),
        ("store, complete (reads)", folder / "store"),
    ):
        spent = defaultdict(float)
        with (
            timed(spent, "featurise", Featurizer, "compute_batch"),
            timed(spent, "store", FeatureStore, "append"),
            timed(spent, "store", FeatureStore, "read"),
            timed(spent, "store", FeatureStore, "finish"),
            timed(spent, "store", serve, "batch_fingerprint"),
        ):
            t0 = time.perf_counter()
            out = est.influence_across_checkpoints(
                checkpoints=[CheckpointSpec(str(checkpoint), weight=1.0)],
                train_loader=train,
                query_loader=query,
                loss_fn=next_token_loss,
                train_store=store,
                progress=True,
            )
            total = time.perf_counter() - t0
        results.append(out.sdi)
        other = total - spent["featurise"] - spent["store"]
        rows.append(
            f"| {label} | {total:.1f} s | {spent['featurise']:.1f} s | {spent['store']:.1f} s | "
            f"{other:.1f} s |"
        )
    same = all(torch.equal(results[0], r) for r in results[1:])
    rows.append(
        f"\nN_train = {n_train:,} ({len(train):,} batches of 32), 16 queries; "
        f"scores of the three runs bitwise equal: {same}"
    )
    return rows


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        lscpu = [platform.processor()]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else "?"
    return (
        "\n".join(lscpu)
        + f"\nload average before: {' '.join(load)}; torch threads: {torch.get_num_threads()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=100_000)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--command", default="python " + " ".join(sys.argv))
    args = parser.parse_args()
    header = [
        "# Feature store at scale (format 4: packed data files + SQLite catalogue)",
        "",
        f"Command: `{args.command}`, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        "```",
        machine(),
        "```",
    ]
    print("\n".join(header), flush=True)
    sections = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SDI_BENCH_TMP")) as tmp:
        table, store = appends(Path(tmp) / "appends", args.appends, [1_000, 10_000, 100_000])
        sections += [
            "",
            "## Appends (one store, one process)",
            "",
            "| batches appended | mean time per batch, last 1,000 | median |",
            "|---|---|---|",
            *table,
        ]
        sections += ["", f"## Files per {args.appends:,} batches", "", *files(store.root)]
        big = FeatureStore(Path(tmp) / "big", IDENTITY)
        for i in range(128):
            big.append(torch.randn(32, 8192, generator=torch.Generator().manual_seed(i)), steps=1)
        big.finish()
        sections += [
            "",
            "## Reads of a complete store (page cache)",
            "",
            "| batches | count | bytes | verified | unverified (mmap copy) | verified / unverified |",
            "|---|---|---|---|---|---|",
            *reads(big, "1 MiB (32 x 8192)"),
            *reads(store, "8 KiB (32 x 64)", repeats=1),
        ]
        sections += [
            "",
            "Checksums alone over 64 MiB, for scale:",
            "",
            "| | GB/s |",
            "|---|---|",
            *checksums(),
        ]
        print("\n".join(sections), flush=True)
        e2e = end_to_end(Path(tmp), args.n_train)
        sections += [
            "",
            "## End to end: `influence_across_checkpoints(..., train_store=...)`",
            "",
            "| run | total | featurisation | store | rest |",
            "|---|---|---|---|---|",
            *e2e,
        ]
        print("\n".join(sections[-len(e2e) - 4 :]), flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(header + sections) + "\n")


if __name__ == "__main__":
    main()
