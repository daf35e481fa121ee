"""The cost of verifying feature-store shards, per MB, side by side in one run.

Rows: hashing alone (SHA-256, which the store uses, and BLAKE2b), the store's verified read
(``FeatureStore.read``: read the file, check header, size and SHA-256, wrap as a tensor), and the
unverified read the store did before (``np.load(mmap_mode="r")`` then a copy). Files are read from
the page cache (written just before), so the numbers are CPU cost, not disk speed.

    python bench/speed/store_read.py [--mb 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdi.store import FeatureStore


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="shard size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = args.mb * (1 << 20) // (4 * 1024)
    features = torch.randn(rows, 1024)
    with tempfile.TemporaryDirectory() as folder:
        store = FeatureStore(Path(folder), {"bench": True})
        store.append(features, steps=1)
        path = Path(folder) / store.shards[0]["file"]
        data = path.read_bytes()
        mb = len(data) / (1 << 20)
        cases = {
            "sha256 of the bytes": lambda: hashlib.sha256(data).digest(),
            "blake2b of the bytes": lambda: hashlib.blake2b(data).digest(),
            "verified read (FeatureStore.read)": lambda: store.read(0),
            "unverified read (np.load mmap + copy)": lambda: torch.from_numpy(
                np.array(np.load(path, mmap_mode="r"))
            ),
        }
        assert torch.equal(store.read(0), features)
        seconds = {name: best_of(args.repeats, fn) for name, fn in cases.items()}
    base = seconds["unverified read (np.load mmap + copy)"]
    print(f"shard of {mb:.0f} MiB, best of {args.repeats}")
    print(f"{'':40s} {'ms/MiB':>8s} {'MiB/s':>8s} {'x unverified':>13s}")
    for name, s in seconds.items():
        print(f"{name:40s} {s / mb * 1e3:8.3f} {mb / s:8.0f} {s / base:13.2f}")


if __name__ == "__main__":
    main()
