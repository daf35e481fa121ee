"""Train features on disk: computed once, reused across query sets, resumable after interruption.

Format, and why: one folder per (checkpoint, layout) holding ``manifest.json`` and one ``.npy`` file
per train batch (``shard_000000.npy`` ...). ``.npy`` needs no extra dependency, is memory-mapped on
read (``np.load(mmap_mode="r")``), and a file per batch makes appending crash-safe: each shard is
written to a temporary name and renamed into place, then the manifest is rewritten the same way, so
a run killed at any instant leaves a manifest that lists only complete shards. Resuming re-reads
those and computes the rest: nothing lost, nothing duplicated. (A single growing memmap or a
safetensors file would need its size up front or a rewrite per append.)

The manifest records what the features depend on -- estimator kind, seed, projection size,
parameter names and widths, the checkpoint's content hash, layout, dtype, package version -- and a
store opened with a different identity raises instead of serving stale features
(:func:`store_identity` builds it; :func:`checkpoint_store` opens the store of one checkpoint and
:func:`read_or_compute` serves its batches, computing and appending those not stored yet).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__

if TYPE_CHECKING:
    from .distributed import LocalSharding, Sharding
    from .featurize import ParamBlock

FORMAT_VERSION = 1


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureStore:
    """Append-only shards of train features ``(b, D)`` (summed over steps) or ``(b, S, D)``.

    Args:
        root: the store's folder (created if missing).
        identity: JSON-able dict of everything the features depend on; must equal the stored one.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any]):
        self.root = Path(root)
        self.identity = {"format": FORMAT_VERSION, **identity}
        self._manifest = self.root / "manifest.json"
        if self._manifest.exists():
            stored = json.loads(self._manifest.read_text())
            if stored["identity"] != self.identity:
                raise ValueError(
                    f"feature store {self.root} was written for other settings: {_diff(stored['identity'], self.identity)}"
                )
            self.shards: list[dict[str, Any]] = stored["shards"]
            self.complete: bool = stored["complete"]
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.shards, self.complete = [], False
            self._save()

    def _save(self) -> None:
        text = json.dumps(
            {"identity": self.identity, "shards": self.shards, "complete": self.complete}, indent=1
        )
        _write_atomic(self._manifest, lambda f: f.write(text.encode()))

    def read(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Shard ``index`` as a tensor on ``device``."""
        array = np.load(self.root / self.shards[index]["file"], mmap_mode="r")
        return torch.from_numpy(np.array(array)).to(device)  # copy: the memmap is read-only

    def append(self, features: torch.Tensor, steps: int) -> None:
        """Write one batch's features as the next shard, then record it in the manifest."""
        name = f"shard_{len(self.shards):06d}.npy"
        array = features.detach().to("cpu", torch.float32).numpy()
        _write_atomic(self.root / name, lambda f: np.save(f, array))
        self.shards.append({"file": name, "rows": int(array.shape[0]), "steps": int(steps)})
        self._save()

    def finish(self) -> None:
        self.complete = True
        self._save()


def _diff(stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)


def checkpoint_digest(path: str | Path) -> str:
    """The checkpoint file's SHA-256; a checkpoint that is no file (custom loader) is identified by
    its name alone."""
    path = str(path)
    return file_sha256(path) if os.path.isfile(path) else hashlib.sha256(path.encode()).hexdigest()


def store_identity(
    estimator: dict[str, Any],
    blocks: Sequence[ParamBlock],
    checkpoint_path: str | Path,
    digest: str,
    layout: str,
    sharding: Sharding | LocalSharding,
) -> dict[str, Any]:
    """Everything one checkpoint's stored train features depend on.

    ``estimator``: the estimator's kind and sketch settings; ``blocks``: the selected parameters'
    names and column widths; ``digest``: :func:`checkpoint_digest`; ``layout``: ``"per_step"`` or
    ``"summed"``; ``sharding``: adds the rank and world size of a sharded run.
    """
    return {
        **estimator,
        "params": [b.name for b in blocks],
        "widths": [b.columns.stop - b.columns.start for b in blocks],
        "checkpoint": {"file": Path(str(checkpoint_path)).name, "sha256": digest},
        "layout": layout,
        "dtype": "float32",
        "sdi_version": __version__,
        **sharding.store_identity,
    }


def checkpoint_store(
    root: str | Path,
    checkpoint_path: str | Path,
    *,
    estimator: dict[str, Any],
    blocks: Sequence[ParamBlock],
    per_step: bool,
    sharding: Sharding | LocalSharding,
) -> FeatureStore:
    """The store of one checkpoint's train features under ``root`` (arguments as in
    :func:`store_identity`; ``per_step`` picks the layout). One folder per checkpoint and layout,
    and per rank when sharded."""
    digest = checkpoint_digest(checkpoint_path)
    layout = "per_step" if per_step else "summed"
    identity = store_identity(estimator, blocks, checkpoint_path, digest, layout, sharding)
    return FeatureStore(sharding.store_folder(Path(root) / f"{digest[:16]}-{layout}"), identity)


def read_or_compute(
    store: FeatureStore,
    batches: Iterable[Any],
    compute: Callable[[Any], tuple[torch.Tensor, int]],
    device: torch.device | str,
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(features, steps)`` per batch of ``batches``: read where stored, else ``compute(batch)``
    and appended. A complete store is read without iterating ``batches``; the store is marked
    complete once ``batches`` is exhausted."""
    if store.complete:
        for i, shard in enumerate(store.shards):
            yield store.read(i, device), shard["steps"]
        return
    for i, batch in enumerate(batches):
        if i < len(store.shards):  # written before an interruption: read, don't recompute
            yield store.read(i, device), store.shards[i]["steps"]
            continue
        feats, steps = compute(batch)
        store.append(feats, steps)
        yield feats, steps
    store.finish()
