"""Train features on disk: computed once, reused across query sets, resumable after interruption.

Format, and why: one folder per (checkpoint, layout) holding ``manifest.json`` and one ``.npy`` file
per train batch (``shard_000000.npy`` ...). ``.npy`` needs no extra dependency and a file per batch
makes appending crash-safe: each shard is written under a unique temporary name and renamed into
place, then the manifest is rewritten the same way, so a run killed at any instant leaves a manifest
that lists only complete shards. Resuming re-reads those and computes the rest: nothing lost,
nothing duplicated. (A single growing memmap or a safetensors file would need its size up front or
a rewrite per append.)

What is checked:

- The manifest records what the features depend on -- estimator kind, seed, projection size,
  parameter names and widths, the featurizer's settings, the model's structure and the
  ``loss_fn`` (:mod:`sdi.fingerprints`, which says what those digests cover and miss), the
  checkpoint's content (a folder's files included), layout, dtype, package version -- and a store
  opened with a different identity raises :class:`StoreMismatchError` listing what differs. The
  folder is named after the checkpoint's content and the layout alone, so a changed checkpoint
  gets a folder of its own while any other change is an error.
- Every train batch is fingerprinted (:func:`batch_fingerprint`) and checked against the one
  stored with its shard on every run, complete store or not, and a loader with another number of
  batches than a complete store holds is refused (:func:`read_or_compute`). The opt-out
  ``SDI_STORE_TRUST_TRAIN_LOADER=1`` (:func:`trusts_train_loader`) skips the loader on complete
  stores and is unsafe: other train data is then served stale features.
- Every shard entry records the shard's rows, shape, dtype, byte size and SHA-256 of its bytes, and
  the fingerprint of the train batch it came from. Every read checks the first five: a shard that was truncated, emptied, overwritten, copied over another or has
  one flipped bit raises :class:`CorruptShardError` naming the file, or is recomputed with a
  :class:`StoreWarning` when the caller can give its batch.
- A complete store records its number of batches; a store is never marked complete without a shard.
- A manifest that is empty, truncated, not JSON or lacks a field raises :class:`CorruptManifestError`
  naming the file and the fix (delete the folder).

Opening and serving: :func:`store_identity` builds the identity, :func:`checkpoint_store` opens the
store of one checkpoint's train features, and :func:`read_or_compute` serves its batches, computing
and appending those not stored yet.

Concurrency: every change of the folder (a shard or the manifest) is made under an exclusive
``fcntl.flock`` on ``<folder>/.lock``, after re-reading the manifest, so writers in several
processes serialise and each adopts the shards another already wrote. The lock is POSIX-advisory:
it binds only processes that take it (this module), and on file systems without ``flock`` support
(some network mounts) it may not hold across machines. Readers need no lock: files only ever appear
by an atomic rename, and every read is verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import mmap
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__

if TYPE_CHECKING:
    from .distributed import LocalSharding, Sharding
    from .featurize import ParamBlock

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock, a single writer per store is assumed
    fcntl = None

FORMAT_VERSION = 3  # 3: the identity holds the model, loss_fn and a checkpoint folder's content
TRUST_LOADER_ENV = "SDI_STORE_TRUST_TRAIN_LOADER"  # "1": a complete store skips the loader (unsafe)
MANIFEST = "manifest.json"
LOCK = ".lock"
_NPY_HEADER_MAX = 10 + 0xFFFF  # magic, version, length, then a version-1.0 header of <= 64 KiB
_DELETE_HINT = "delete the folder {root} (its features are recomputed on the next run)"


class StoreError(ValueError):
    """A feature store that cannot be used as it is; the message names the store and the fix."""

    def __init__(self, store: str | Path, message: str):
        super().__init__(f"feature store {store}: {message}")
        self.store = Path(store)
        self._message = message

    def __reduce__(self):  # picklable across processes, whatever the subclass's arguments
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):
    err = cls.__new__(cls)
    (OSError if issubclass(cls, OSError) else Exception).__init__(err, *args)
    err.__dict__.update(state)
    return err


class CorruptShardError(StoreError):
    """Shard ``file`` of ``store`` does not hold what the manifest says (``what``)."""

    def __init__(self, store: str | Path, file: str, what: str):
        super().__init__(store, f"shard {file} {what}")
        self.file, self.what = file, what


class CorruptManifestError(StoreError):
    """``file`` (the manifest) of ``store`` is unreadable or incomplete (``what``)."""

    def __init__(self, store: str | Path, file: str, what: str):
        hint = _DELETE_HINT.format(root=store)
        super().__init__(store, f"{file} {what}; {hint}")
        self.file, self.what = file, what


class StoreMismatchError(StoreError):
    """The store was written for other train data or settings than the caller's."""


_WRITE_FIX = {
    errno.ENOSPC: "Free space",
    errno.EDQUOT: "Free space within your quota",
    errno.EFBIG: "Raise the file size limit",
    errno.EROFS: "Make the folder writable",
    errno.EACCES: "Make the folder writable",
}


class StoreWriteError(OSError):
    """Writing ``file`` into ``store`` failed (e.g. a full disk); ``needed`` bytes were to be written."""

    def __init__(self, store: str | Path, file: str, needed: int, cause: OSError):
        free = _free_bytes(store)
        super().__init__(
            cause.errno,
            f"feature store {store}: could not write {file} ({needed} bytes needed, "
            f"{'unknown' if free is None else free} bytes free on its disk): "
            f"{cause.strerror or cause}. {_WRITE_FIX.get(cause.errno, 'Fix that')} or pass another "
            "folder, then rerun: the store resumes after its last complete shard",
        )
        self.store, self.file, self.needed = Path(store), file, needed

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.__dict__)


class StoreWarning(UserWarning):
    """A bad shard was found and recomputed from its train batch."""


def _free_bytes(path: str | Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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


_SHARD_KEYS = {
    "file": str,
    "rows": int,
    "steps": int,
    "shape": list,
    "dtype": str,
    "bytes": int,
    "sha256": str,
}


@dataclasses.dataclass
class _State:
    """What the manifest holds besides the identity."""

    shards: list[dict[str, Any]]
    complete: bool = False
    batches: int | None = None
    signature: tuple | None = None  # the manifest file's (device, inode, size, times) when read


class FeatureStore:
    """Append-only shards of train features ``(b, D)`` (summed over steps) or ``(b, S, D)``.

    Args:
        root: the store's folder (created if missing).
        identity: JSON-able dict of everything the features depend on; must equal the stored one.

    ``shards`` lists the manifest's entries (``file``, ``rows``, ``steps``, ``shape``, ``dtype``,
    ``bytes``, ``sha256``, ``fingerprint``), ``complete`` whether every batch is stored and
    ``batches`` how many batches a complete store holds. The view is refreshed from disk whenever
    this object changes the store, so shards written by another process are adopted.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any]):
        self.root = Path(root)
        self.identity = {"format": FORMAT_VERSION, **identity}
        self._manifest = self.root / MANIFEST
        self._held = False
        self._seen: tuple | None = None  # the manifest file as this object last read or wrote it
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._remove_stale_temporaries()
            state = self._load()
            if state is None:
                state = _State(shards=[])
                self._write_manifest(state)
        self._adopt(state)

    # -- reading ---------------------------------------------------------------------------------

    def read(
        self,
        index: int,
        device: torch.device | str = "cpu",
        *,
        recompute: Callable[[], tuple[torch.Tensor, int] | None] | None = None,
    ) -> torch.Tensor:
        """Shard ``index`` as a float32 tensor on ``device``, verified against its manifest entry.

        A shard that fails a check raises :class:`CorruptShardError`, unless ``recompute`` is given
        and returns ``(features, steps)`` for its batch: then it warns (:class:`StoreWarning`),
        rewrites the shard and returns those features. ``recompute`` returning ``None`` means the
        batch is not available: the error is raised, saying so.
        """
        try:
            return self._verified(index).to(device)
        except CorruptShardError as first:
            error = first
        if self._refresh_entry(index):  # another writer may have replaced it since we looked
            try:
                return self._verified(index).to(device)
            except CorruptShardError as second:
                error = second
        fresh = None if recompute is None else recompute()
        if fresh is None:
            if recompute is not None:
                raise CorruptShardError(
                    self.root,
                    error.file,
                    f"{error.what}, and its train batch {index} is not in the "
                    "train loader to recompute it; " + _DELETE_HINT.format(root=self.root),
                ) from error
            raise error
        features, steps = fresh
        warnings.warn(f"{error}; recomputing it from its train batch", StoreWarning, stacklevel=2)
        self.replace(index, features, steps)
        return features.to(device)

    def _verified(self, index: int) -> torch.Tensor:
        entry = self.shards[index]
        name = entry["file"]
        path = self.root / name

        def bad(what: str) -> CorruptShardError:
            return CorruptShardError(self.root, name, what)

        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise bad("is empty (0 bytes)")
                # Copied out of a memory map: several times faster than read() into a new buffer.
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = np.frombuffer(mapped, np.uint8)
                    data = view.copy()  # what is checked is what is returned
                    del view  # the map cannot close while a view exports it
        except FileNotFoundError:
            raise bad("is missing") from None
        except (OSError, ValueError) as err:  # ValueError: emptied between the size and the map
            raise bad(f"cannot be read ({err})") from err
        try:
            header = io.BytesIO(data[:_NPY_HEADER_MAX].tobytes())
            version = np.lib.format.read_magic(header)
            if version != (1, 0):
                raise ValueError(f"npy version {version}, not 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
        except Exception as err:  # numpy raises several kinds for a garbage header
            raise bad(f"is not a .npy file as this store writes them ({err})") from None
        want_shape, want_dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        if shape[:1] != (entry["rows"],):
            raise bad(f"holds {shape[0] if shape else 0} rows, the manifest says {entry['rows']}")
        if shape != want_shape or dtype != want_dtype or fortran:
            raise bad(
                f"holds shape {shape} {dtype}{' (Fortran order)' if fortran else ''}, the manifest "
                f"says {want_shape} {want_dtype}"
            )
        if len(data) != entry["bytes"]:
            cut = "is truncated: " if len(data) < entry["bytes"] else ""
            raise bad(f"{cut}has {len(data)} bytes, the manifest says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise bad("does not match its SHA-256 in the manifest: its bytes changed after writing")
        return torch.from_numpy(data[header.tell() :].view(dtype).reshape(shape))

    # -- checks ----------------------------------------------------------------------------------

    def check_fingerprint(self, index: int, fingerprint: str) -> None:
        """Raise :class:`StoreMismatchError` if batch ``index`` is not the batch shard ``index`` holds.

        ``fingerprint`` is :func:`batch_fingerprint` of the caller's batch ``index``; a shard stored
        without a fingerprint is not checked.
        """
        entry = self.shards[index]
        stored = entry.get("fingerprint")
        if stored is not None and stored != fingerprint:
            raise StoreMismatchError(
                self.root,
                f"train batch {index} differs from the batch whose features {entry['file']} holds "
                f"(fingerprint {stored[:12]}... stored, {fingerprint[:12]}... now): the train loader "
                "yields other data or batch sizes than when the store was written; pass another "
                f"folder or {_DELETE_HINT.format(root=self.root)}",
            )

    def check_batches(self, batches: int, *, at_least: bool = False) -> None:
        """Raise :class:`StoreMismatchError` if a complete store holds another number of batches
        (``at_least``: the loader yields ``batches`` or more, which is known before its end)."""
        if self.complete and (batches > self.batches if at_least else batches != self.batches):
            yields = f"at least {batches}" if at_least else str(batches)
            raise StoreMismatchError(
                self.root,
                f"it holds {self.batches} train batches, but the train loader yields {yields}; "
                f"pass another folder or {_DELETE_HINT.format(root=self.root)}",
            )

    # -- writing ---------------------------------------------------------------------------------

    def append(self, features: torch.Tensor, steps: int, *, fingerprint: str | None = None) -> None:
        """Store one batch's features as shard ``len(self.shards)``, then record it in the manifest.

        If another process stored that shard meanwhile, its shard is adopted instead (after checking
        that both came from the same batch when both have fingerprints).
        """
        index = len(self.shards)
        with self._locked():
            state = self._load_existing()
            if len(state.shards) < index:
                raise CorruptManifestError(
                    self.root,
                    MANIFEST,
                    f"lists {len(state.shards)} shards, fewer than the {index} "
                    "this process read before: it was rewritten by something else",
                )
            if len(state.shards) > index:  # another writer was faster: keep its shard
                other = state.shards[index]
                theirs = other.get("fingerprint")
                if fingerprint is not None and theirs is not None and theirs != fingerprint:
                    raise StoreMismatchError(
                        self.root,
                        f"another process stored a different train batch {index} "
                        f"({other['file']}): two runs with other train loaders share this folder",
                    )
            elif state.complete:
                raise StoreMismatchError(
                    self.root,
                    f"it is complete with {index} train batches, but the train loader yields more; "
                    f"pass another folder or {_DELETE_HINT.format(root=self.root)}",
                )
            else:
                state.shards.append(self._write_shard(index, features, steps, fingerprint))
                self._write_manifest(state)
        self._adopt(state)

    def replace(
        self, index: int, features: torch.Tensor, steps: int, *, fingerprint: str | None = None
    ) -> None:
        """Rewrite shard ``index`` with recomputed features (keeping its fingerprint if none given)."""
        with self._locked():
            state = self._load_existing()
            if index >= len(state.shards):
                raise IndexError(f"feature store {self.root} has no shard {index} to replace")
            old = state.shards[index]
            if fingerprint is None:
                fingerprint = old.get("fingerprint")
            state.shards[index] = self._write_shard(index, features, steps, fingerprint)
            self._write_manifest(state)
        self._adopt(state)

    def finish(self, batches: int | None = None, *, allow_empty: bool = False) -> None:
        """Mark the store complete with ``batches`` train batches (default: the shards stored).

        Raises :class:`StoreError` for a store without a shard (unless ``allow_empty``: a rank that
        owns no batch) and :class:`StoreMismatchError` if ``batches`` is not the number stored.
        """
        with self._locked():
            state = self._load_existing()
            stored = len(state.shards)
            batches = stored if batches is None else batches
            if batches == 0 and not allow_empty:
                raise StoreError(
                    self.root,
                    "the train loader yielded no batches: nothing is stored and the store is not "
                    "marked complete",
                )
            if batches != stored:
                raise StoreMismatchError(
                    self.root,
                    f"it holds {stored} shards, but the train loader yielded {batches} batches; "
                    f"pass another folder or {_DELETE_HINT.format(root=self.root)}",
                )
            if state.complete:
                if state.batches != batches:
                    raise StoreMismatchError(
                        self.root, f"it was completed with {state.batches} batches, now {batches}"
                    )
            else:
                state.complete, state.batches = True, batches
                self._write_manifest(state)
        self._adopt(state)

    def _write_shard(
        self, index: int, features: torch.Tensor, steps: int, fingerprint: str | None
    ) -> dict[str, Any]:
        array = features.detach().to("cpu", torch.float32).contiguous().numpy()
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=(1, 0), allow_pickle=False)
        data = buffer.getbuffer()
        name = f"shard_{index:06d}.npy"
        self._write_file(name, data)
        return {
            "file": name,
            "rows": int(array.shape[0]),
            "steps": int(steps),
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "fingerprint": fingerprint,
        }

    def _write_manifest(self, state: _State) -> None:
        manifest = {
            "identity": self.identity,
            "shards": state.shards,
            "complete": state.complete,
            "batches": state.batches,
        }
        self._write_file(MANIFEST, json.dumps(manifest, indent=1).encode())
        state.signature = self._signature()

    def _write_file(self, name: str, data) -> None:
        """Write ``data`` to ``name`` atomically: a unique temporary file, fsync, rename."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
            try:
                _write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.root / name)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise StoreWriteError(self.root, name, len(data), err) from err
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise

    # -- the manifest and the lock ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """Hold the store's exclusive advisory lock (``flock`` on ``.lock``) for the block."""
        if fcntl is None or self._held:
            yield
            return
        fd = None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # a read-only folder: lock if we can
            with contextlib.suppress(OSError):
                fd = os.open(self.root / LOCK, flags, 0o666)
                break
        if fd is None:  # read-only and never written with a lock: nobody can write here
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._held = True
            yield
        finally:
            self._held = False
            os.close(fd)  # releases the lock

    def _remove_stale_temporaries(self) -> None:
        # Writers only write under the lock, which we hold: any temporary left is from a killed run.
        for path in self.root.glob("*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()

    def _adopt(self, state: _State) -> None:
        self.shards, self.complete, self.batches = state.shards, state.complete, state.batches
        self._seen = state.signature

    def _refresh_entry(self, index: int) -> bool:
        """Re-read the manifest; whether shard ``index``'s entry changed."""
        with self._locked():
            state = self._load_existing(fresh=True)
        before = self.shards[index]
        self._adopt(state)
        return index < len(state.shards) and state.shards[index] != before

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self._manifest)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _load_existing(self, fresh: bool = False) -> _State:
        """The manifest's state (under the lock); unchanged since we last saw it: not re-parsed."""
        if not fresh and self._seen is not None and self._signature() == self._seen:
            return _State(list(self.shards), self.complete, self.batches, self._seen)  # a copy
        state = self._load()
        if state is None:
            raise CorruptManifestError(self.root, MANIFEST, "is missing (deleted during the run?)")
        return state

    def _load(self) -> _State | None:
        """The manifest's state after checking its identity; ``None`` if there is no manifest."""

        def bad(what: str) -> CorruptManifestError:
            return CorruptManifestError(self.root, MANIFEST, what)

        signature = self._signature()
        try:
            raw = self._manifest.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise bad(f"cannot be read ({err})") from err
        if not raw.strip():
            raise bad("is empty")
        try:
            stored = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("is not text (garbage bytes)") from None
        except json.JSONDecodeError as err:
            raise bad(f"is not valid JSON (truncated or garbage: {err})") from None
        if not isinstance(stored, dict):
            raise bad(f"holds a JSON {type(stored).__name__}, not an object")
        missing = [k for k in ("identity", "shards", "complete", "batches") if k not in stored]
        if "identity" in missing:
            raise bad("lacks the key 'identity'")
        if not isinstance(stored["identity"], dict):
            raise bad("has an 'identity' that is not an object")
        if stored["identity"] != self.identity:
            raise StoreMismatchError(
                self.root,
                f"was written for other settings: {_diff(stored['identity'], self.identity)}; pass "
                f"another folder or {_DELETE_HINT.format(root=self.root)}",
            )
        if missing:
            raise bad(f"lacks the key(s) {', '.join(map(repr, missing))}")
        shards, complete, batches = stored["shards"], stored["complete"], stored["batches"]
        if not isinstance(shards, list):
            raise bad("has 'shards' that is not a list")
        for i, entry in enumerate(shards):
            problem = _entry_problem(entry, i)
            if problem:
                raise bad(f"has a bad entry for shard {i}: {problem}")
        if not isinstance(complete, bool):
            raise bad("has a 'complete' that is not true/false")
        if complete and (type(batches) is not int or batches != len(shards)):
            raise bad(f"is marked complete with {batches!r} batches but lists {len(shards)} shards")
        return _State(
            shards=shards,
            complete=complete,
            batches=batches if complete else None,
            signature=signature,  # taken under the lock: nobody rewrote it since
        )


def _entry_problem(entry: Any, index: int) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    for key, kind in _SHARD_KEYS.items():
        if key not in entry:
            return f"lacks the key {key!r}"
        if type(entry[key]) is not kind:
            return f"{key!r} is not a {kind.__name__}"
    if entry["file"] != f"shard_{index:06d}.npy":
        return f"file {entry['file']!r} is not shard_{index:06d}.npy"
    if not all(type(n) is int and n >= 0 for n in entry["shape"]) or not entry["shape"]:
        return f"shape {entry['shape']!r} is not a list of sizes"
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return "'sha256' is not a SHA-256 hex digest"
    try:
        np.dtype(entry["dtype"])
    except TypeError:
        return f"dtype {entry['dtype']!r} is not a numpy dtype"
    if not isinstance(entry.get("fingerprint"), str | type(None)):
        return "'fingerprint' is not a string"
    return None


def _write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written; a write that makes no progress is a full disk."""
    done = 0
    while done < len(data):
        n = os.write(fd, data[done:])
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def _diff(stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}" for k in keys)


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
    :func:`sdi.passes.feature_inputs`). The train batches are checked shard by shard instead
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


def checkpoint_store(
    root: str | Path,
    checkpoint_path: str | Path,
    *,
    digest: str,
    estimator: dict[str, Any],
    inputs: Mapping[str, Any],
    blocks: Sequence[ParamBlock],
    per_step: bool,
    sharding: Sharding | LocalSharding,
) -> FeatureStore:
    """The store of one checkpoint's train features under ``root`` (arguments as in
    :func:`store_identity`; ``per_step`` picks the layout).

    One folder per checkpoint content and layout (``<digest[:16]>-<layout>``), and per rank when
    sharded: a checkpoint rewritten with new weights gets a folder of its own. Everything else in
    the identity is checked against the folder's manifest (:class:`StoreMismatchError`).
    """
    layout = "per_step" if per_step else "summed"
    identity = store_identity(estimator, blocks, checkpoint_path, digest, layout, sharding, inputs)
    return FeatureStore(sharding.store_folder(Path(root) / f"{digest[:16]}-{layout}"), identity)


def trusts_train_loader() -> bool:
    """Whether ``SDI_STORE_TRUST_TRAIN_LOADER=1``: complete stores are served without reading the
    train loader. Unsafe: other train data, or another number of batches, is then not noticed."""
    return os.environ.get(TRUST_LOADER_ENV, "").strip() == "1"


def read_or_compute(
    store: FeatureStore,
    batches: Iterable[Any],
    compute: Callable[[Any], tuple[torch.Tensor, int]],
    device: torch.device | str,
    *,
    allow_empty: bool,
    after_append: Callable[[], Any] | None = None,
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(features, steps)`` per batch of ``batches``: read where stored, else ``compute(batch)``
    and appended (then ``after_append()``, a progress bar's update).

    Every batch is fingerprinted (:func:`batch_fingerprint`) and checked against its stored shard,
    complete store or not, so other train data is a :class:`StoreMismatchError` naming the batch; a
    loader with more or fewer batches than a complete store holds is one too. A corrupt shard is
    recomputed from its batch. An interrupted store is resumed: stored batches are read, the rest
    computed and appended; the store is marked complete once ``batches`` is exhausted
    (``allow_empty``: a rank may own no batch). With :func:`trusts_train_loader`, a complete store
    is read without iterating ``batches`` (a corrupt shard is still recomputed from its batch).
    """
    if store.complete and trusts_train_loader():
        yield from _read_trusting(store, batches, compute, device)
        return
    n = 0
    for n, batch in enumerate(batches, 1):
        i, fingerprint = n - 1, batch_fingerprint(batch)
        if i < len(store.shards):  # stored by an earlier (maybe interrupted) run: read it
            store.check_fingerprint(i, fingerprint)
            features = store.read(i, device, recompute=lambda b=batch: compute(b))
            yield features, store.shards[i]["steps"]
            continue
        store.check_batches(n, at_least=True)  # before featurising a batch a complete store lacks
        features, steps = compute(batch)
        store.append(features, steps, fingerprint=fingerprint)
        if after_append is not None:
            after_append()
        yield features, steps
    store.finish(n, allow_empty=allow_empty)


def _read_trusting(store, batches, compute, device) -> Iterator[tuple[torch.Tensor, int]]:
    """A complete store's shards, the train loader read only to recompute a corrupt shard."""

    def recompute(i):  # from its batch, if the loader still has it unchanged
        batch = batch_at(batches, i)
        if batch is None:
            return None
        store.check_fingerprint(i, batch_fingerprint(batch))
        return compute(batch)

    for i, shard in enumerate(store.shards):
        yield store.read(i, device, recompute=lambda i=i: recompute(i)), shard["steps"]
