"""What stored features depend on: the store's identity and each train batch's fingerprint.

The identity (:func:`store_identity`) is checked when a store is opened; the fingerprint of every
train batch (:func:`batch_fingerprint`) is checked against the one stored with its block on every
run (:func:`sdi.store.read_or_compute`), unless :func:`trusts_train_loader`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__

if TYPE_CHECKING:
    from ..distributed import LocalSharding, Sharding
    from ..featurize import ParamBlock

FORMAT_VERSION = (
    4  # 4: packed data files and a SQLite catalogue (3: manifest.json + one .npy a batch)
)
TRUST_LOADER_ENV = "SDI_STORE_TRUST_TRAIN_LOADER"  # "1": a complete store skips the loader (unsafe)


def batch_fingerprint(batch: Any) -> str:
    """SHA-256 (hex) of a batch's content: every tensor's dtype, shape and bytes, in structure.

    ``batch`` may nest dicts (any ``Mapping``; keys are sorted, so insertion order does not
    matter), lists and tuples (treated alike), dataclasses, torch tensors, numpy arrays and scalars,
    ``int``, ``float``, ``bool``, ``str``, ``bytes`` and ``None``. Equal content gives an equal
    fingerprint in any process; any change of a value, shape, dtype, key or nesting changes it. A
    tensor on a GPU is copied to the CPU to be hashed. Any other type raises ``TypeError``.
    """
    digest = hashlib.sha256()
    _hash_into(digest, batch)
    return digest.hexdigest()


def _hash_into(digest, obj: Any) -> None:
    def put(tag: str, payload: bytes = b"") -> None:  # length-prefixed: no two encodings collide
        digest.update(tag.encode() + b":" + len(payload).to_bytes(8, "little") + payload)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        put("tensor", f"{t.dtype}{tuple(t.shape)}".encode())
        put("data", t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray | np.generic):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            put("object-array", repr(a.shape).encode())
            for item in a.reshape(-1):
                _hash_into(digest, item)
        else:
            put("ndarray", f"{a.dtype.str}{a.shape}".encode())
            put("data", np.ascontiguousarray(a).tobytes())
    elif obj is None or isinstance(obj, bool | int | float | str):
        put(type(obj).__name__, repr(obj).encode())  # repr of a float round-trips exactly
    elif isinstance(obj, bytes | bytearray):
        put("bytes", bytes(obj))
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        put("mapping", str(len(items)).encode())
        for key, value in items:
            _hash_into(digest, key)
            _hash_into(digest, value)
    elif isinstance(obj, list | tuple):
        put("sequence", str(len(obj)).encode())
        for item in obj:
            _hash_into(digest, item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        put("dataclass", type(obj).__qualname__.encode())
        _hash_into(digest, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    else:
        raise TypeError(
            f"cannot fingerprint a train batch holding a {type(obj).__qualname__}: batches must be "
            "tensors, numpy arrays, numbers, strings or dicts/lists/tuples/dataclasses of them"
        )


def batch_at(loader, index: int) -> Any | None:
    """Batch ``index`` of ``loader`` (iterated afresh from its start), or ``None`` if it is shorter."""
    return next(islice(iter(loader), index, None), None)


def store_identity(
    estimator: dict[str, Any],
    blocks: Sequence[ParamBlock],
    checkpoint_path: str | Path,
    digest: str,
    layout: str,
    sharding: Sharding | LocalSharding,
    inputs: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything one checkpoint's stored train features depend on.

    ``estimator``: the estimator's kind and sketch settings; ``blocks``: the selected parameters'
    names and column widths; ``digest``: the checkpoint's
    :func:`sdi.fingerprints.checkpoint_fingerprint`; ``layout``: ``"per_step"`` or ``"summed"``;
    ``sharding``: adds the rank and world size of a sharded run; ``inputs``: the other inputs of
    the features (the model's structure, the ``loss_fn``, the featurizer's settings:
    :func:`sdi.passes.feature_inputs`). The train batches are checked batch by batch instead
    (:func:`read_or_compute`). ``checkpoint_path`` is not part of it: a copied or renamed
    checkpoint has the same content, so the same features.
    """
    return {
        **estimator,
        **inputs,
        "params": [b.name for b in blocks],
        "widths": [b.columns.stop - b.columns.start for b in blocks],
        # The content alone: a copied or renamed checkpoint serves the same store.
        "checkpoint": {"sha256": digest},
        "layout": layout,
        "dtype": "float32",
        "sdi_version": __version__,
        **sharding.store_identity,
    }


def trusts_train_loader() -> bool:
    """Whether ``SDI_STORE_TRUST_TRAIN_LOADER=1``: complete stores are served without reading the
    train loader. Unsafe: other train data, or another number of batches, is then not noticed."""
    return os.environ.get(TRUST_LOADER_ENV, "").strip() == "1"
