"""Sharding the train set over processes with ``torch.distributed``.

When a default process group of more than one process is initialised (``torchrun``), the estimators
split the train set between the ranks and gather the rows afterwards (``featurize_loader`` splits
its loader the same way and gathers the feature rows). With no process group, or a group of one,
:func:`sharding_of` gives a :class:`LocalSharding` instead: the same interface, doing nothing, so
the estimators run one code path either way.

Batch ownership: every rank iterates the same train loader and featurises only the batches
``i`` with ``i % world_size == rank``, skipping the others without featurising them (loading a
batch is cheap next to featurising it). The query set is featurised on every rank. Each rank
contracts its train batches with the whole query set, so it holds the output rows of its own
batches; :meth:`Sharding.gather` puts every rank's rows back in the loader's order, which gives
exactly what one process computes (the same batches go through the same arithmetic). A loader
whose sampler is a ``DistributedSampler`` is refused: it would split the set a second time.

Gathering: tensor collectives (``gather`` / ``all_gather``), every rank's rows padded to the longest
share, on the features' device when the group runs NCCL and on the CPU under gloo. Small metadata
(row counts, shapes, errors) goes through ``all_gather_object``.

Consistency: at the start of a call every rank sends a small fingerprint of what it was given --
the checkpoints' content digests and weights, seed, projection size, selected parameters, model
structure and number of train batches -- in one ``all_gather_object``
(:meth:`Sharding.check_same`); if the ranks differ, every rank raises :class:`RankMismatchError`
naming the fields and each rank's value, instead of computing rows that do not fit together.

Failures: every exchange of a call (the consistency check, row counts and shapes, errors) is an
``all_gather_object``, and the estimators run each call inside :func:`failures_shared`: a rank on
which anything raises before the call's final gather -- ``loss_fn``, loader, checkpoint loading,
the feature store, the estimator's own checkpoint loop or the gather itself -- joins the exchange
the other ranks are in (or next start) with its error, so they raise :class:`RankFailed` at once
instead of waiting. An error raised on every rank from what the ranks exchanged (a mismatch) is not
sent again. After the final gather, nothing is sent: the other ranks may have returned. A rank that
dies without raising leaves the others waiting up to the process group's timeout
(``init_process_group(timeout=...)``), which must also cover the slowest rank's share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

GatherTo = int | Literal["all"] | None


class RankFailed(RuntimeError):
    """Raised on every rank whose pass succeeded when another rank's pass raised."""


class RankMismatchError(ValueError):
    """Raised on every rank when the ranks were given different inputs (``fields``: name ->
    every rank's value, for the fields that differ)."""

    def __init__(self, fields: dict[str, list[Any]]):
        parts = [
            f"{name} ({', '.join(f'rank {r}: {_short(v)}' for r, v in enumerate(values))})"
            for name, values in fields.items()
        ]
        super().__init__(
            f"the ranks were given different {'; '.join(parts)}: every rank must get the same "
            "checkpoints, estimator settings, parameters and loaders"
        )
        self.fields = fields


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Call:
    """One estimator call under :func:`failures_shared`: whether the other ranks still exchange."""

    open: bool = True  # False once a final gather is done: the others may have returned


_CALL: ContextVar[_Call | None] = ContextVar("sdi_distributed_call", default=None)
_KNOWN = "_sdi_known_to_every_rank"  # set on an error that every rank already has


def _known_to_all(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank (from what they exchanged): it is not sent again."""
    with contextlib.suppress(AttributeError):
        setattr(error, _KNOWN, True)
    return error


def _multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def failures_shared(device: torch.device | str):
    """Run one estimator call; an ``Exception`` raised inside is sent to the other ranks (who raise
    :class:`RankFailed`) before it propagates, unless every rank has it already or the call's final
    gather is done. ``device``: the features' device (object collectives run there under NCCL).
    A process that runs alone sends nothing."""
    token = _CALL.set(_Call())
    try:
        yield
    except Exception as err:
        _report(err, torch.device(device))
        raise
    finally:
        _CALL.reset(token)


def _report(error: BaseException, comm: torch.device) -> None:
    call = _CALL.get()
    if isinstance(error, RankFailed) or getattr(error, _KNOWN, False):
        return
    if (call is not None and not call.open) or not _multi_process():
        return
    _known_to_all(error)  # sent once: the others raise, and will not join a second exchange
    _all_gather_object({"error": f"{type(error).__name__}: {error}"}, dist.get_world_size(), comm)


def _all_gather_object(obj: Any, world: int, comm: torch.device) -> list[Any]:
    everyone: list[Any] = [None] * world
    # Under NCCL, object collectives run on the current CUDA device: make it the features'.
    with torch.cuda.device(comm) if comm.type == "cuda" else nullcontext():
        dist.all_gather_object(everyone, obj)
    return everyone


def _raise_failed(meta: list[dict[str, Any]]) -> None:
    failed = [f"rank {r} failed: {m['error']}" for r, m in enumerate(meta) if "error" in m]
    if failed:
        raise RankFailed("; ".join(failed))


def _expect_more(more: bool) -> None:
    """Whether every rank makes another exchange in this call: ``True`` at an exchange that is
    not the last (the check, a total), ``False`` once a gather that may be the last is done (from
    then on an error is not sent: the other ranks may have returned)."""
    call = _CALL.get()
    if call is not None:
        call.open = more


class _Owned:
    """The batches of ``loader`` that one rank featurises; iterable any number of times."""

    def __init__(self, loader: Iterable[Any], rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.loader), self.rank, None, self.world)


class Sharding:
    """One call's view of the process group: which batches are this rank's, and the collectives.

    Args:
        rank, world: this process and the group size (``world > 1``).
        device: where the features (and returned results) live.
        comm: where tensor collectives run (the features' device under NCCL, the CPU under gloo).
        to: who receives gathered results: a rank, ``"all"``, or ``None`` (each rank keeps its own
            rows, in its loader order).
        name: what the sharded loader is called in error messages (``"train_loader"``).

    The gathers take ``counts``: the rows of each batch this rank featurised in its latest pass over
    its loader, which places every rank's rows in the loader's order.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        comm: torch.device,
        to: GatherTo,
        name: str = "train_loader",
    ):
        self.rank, self.world, self.device, self.comm, self.to = rank, world, device, comm, to
        self.name = name

    may_own_no_batch = True  # a loader of fewer batches than ranks leaves some ranks none

    @property
    def store_identity(self) -> dict[str, Any]:
        """What a rank's stored features depend on beyond one process's identity."""
        return {"shard": {"rank": self.rank, "world_size": self.world}}

    def store_folder(self, folder: Path) -> Path:
        """One store folder per rank, each written and resumed by its rank alone."""
        return folder / f"rank{self.rank}-of{self.world}"

    def require_receiver(self, what: str) -> None:
        """Refuse ``gather_to=None`` for a result that only exists merged over the ranks."""
        if self.to is None:
            raise ValueError(f"{what} needs gather_to to be a rank or 'all'")

    def owned(self, loader: Iterable[Any]) -> Iterable[Any]:
        """The batches ``i`` of ``loader`` with ``i % world == rank``."""
        return _Owned(loader, self.rank, self.world)

    def check_same(self, fields: dict[str, Any]) -> None:
        """Raise :class:`RankMismatchError` on every rank unless every rank passes equal ``fields``
        (small, picklable values: digests, settings, counts); :class:`RankFailed` if a rank failed
        before. One ``all_gather_object``."""
        _expect_more(True)
        meta = self._all_gather_object({"fields": fields})
        _raise_failed(meta)
        names = sorted({name for m in meta for name in m["fields"]})
        differ = {
            name: [m["fields"].get(name) for m in meta]
            for name in names
            if any(m["fields"].get(name) != meta[0]["fields"].get(name) for m in meta)
        }
        if differ:
            raise _known_to_all(RankMismatchError(differ))

    def fail(self, error: BaseException) -> None:
        """Join the exchange the other ranks are in, reporting ``error`` (once; nothing for a
        :class:`RankFailed`, an error every rank has, or after the call's final gather)."""
        _report(error, self.comm)

    def total(self, n: int) -> int:
        """The sum of ``n`` over the ranks (an object exchange, so it also carries failures)."""
        _expect_more(True)
        meta = self._all_gather_object({"n": int(n)})
        _raise_failed(meta)
        return sum(m["n"] for m in meta)

    def gather(
        self, rows: dict[str, torch.Tensor], counts: Sequence[int]
    ) -> dict[str, torch.Tensor] | None:
        """Every rank's output rows, in the train loader's order.

        ``rows`` maps a name to this rank's rows ``(n_rank, ...)`` (the rows of its batches, in
        order; a rank that owns no batch may pass ``{}``); ``counts`` the rows of each of its batches.
        Returns ``(N_train, ...)`` per name on the receiving rank(s), ``None`` elsewhere; with
        ``to=None`` every rank gets its own rows back (names it lacked come back with zero rows).
        """
        _, shapes, ids = self._share(rows, counts)
        _expect_more(False)  # maybe the call's last exchange (a later check or total reopens)
        local = {key: self._local(rows, key, shapes) for key in shapes}
        if self.to is None:
            return local
        n_train = sum(len(i) for i in ids)
        longest = max(len(i) for i in ids)
        out = {}
        for key in shapes:
            parts = self._collect(local[key], longest)
            if parts is None:
                continue
            full = torch.empty(
                (n_train, *parts[0].shape[1:]), dtype=parts[0].dtype, device=self.comm
            )
            for part, index in zip(parts, ids, strict=True):
                full[index.to(self.comm)] = part[: len(index)]
            out[key] = full.to(self.device)
        return out or None

    def merge_top(
        self, top: dict[str, torch.Tensor], k: int, counts: Sequence[int]
    ) -> dict[str, torch.Tensor] | None:
        """The ``k`` best train rows per query over all ranks, from each rank's own best.

        ``top`` holds, for ``side`` in ``most``, ``least``: ``{side}_indices (N_query, c)`` (rows of
        this rank, local), ``{side}_tracin (N_query, c)`` and ``{side}_sdi (N_query, c, steps)``
        with ``c = min(k, rows of this rank)``. The global top ``k`` is among the union of every
        rank's top ``k``; ``counts`` as in :meth:`gather`. Returns the same names with ``c = k`` and train-loader row indices,
        ordered as ``torch.topk`` orders them (ties may come in another order than in one process);
        ``None`` on ranks that receive nothing. ``k`` must not exceed the train rows.
        """
        candidates = {key: value.transpose(0, 1) for key, value in top.items()}  # (c, N_query, ...)
        meta, shapes, ids = self._share(candidates, counts)
        _expect_more(False)
        mine = ids[self.rank].to(self.device)  # local row -> train-loader row
        for side in ("most", "least"):
            candidates[f"{side}_indices"] = mine[candidates[f"{side}_indices"]]
        longest = max(m["rows"] for m in meta)
        merged = {}
        for key in shapes:
            parts = self._collect(self._local(candidates, key, shapes), longest)
            if parts is not None:
                merged[key] = torch.cat([p[: m["rows"]] for p, m in zip(parts, meta, strict=True)])
        if not merged:
            return None
        return {key: value.to(self.device) for key, value in _best_of(merged, k).items()}

    def _share(self, rows: dict[str, torch.Tensor], counts: Sequence[int]):
        """Exchange row counts and shapes (raising if any rank failed); place every rank's rows.

        Returns every rank's metadata, ``{name: (shape of one row, dtype)}`` over all ranks (sorted
        by name, so every rank walks the names in the same order), and per rank the train-loader
        row of each of its rows ``(n_rank,)`` int64.
        """
        sizes = {int(value.shape[0]) for value in rows.values()}
        if len(sizes) > 1:  # sent to the other ranks by failures_shared
            raise ValueError(f"rows of one rank differ in number: {sorted(sizes)}")
        meta = self._all_gather_object(
            {
                "counts": list(counts),
                "rows": sizes.pop() if sizes else 0,
                "shapes": {key: (tuple(v.shape[1:]), v.dtype) for key, v in rows.items()},
            }
        )
        _raise_failed(meta)
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for m in meta:
            for key, shape in m["shapes"].items():
                if shapes.setdefault(key, shape) != shape:
                    raise _known_to_all(
                        ValueError(
                            f"ranks computed {key} rows of shapes {shapes[key]} and {shape}: every rank "
                            "must iterate the same loaders"
                        )
                    )
        try:
            ids = _row_ids([m["counts"] for m in meta], self.world, self.name)
        except ValueError as err:  # from what every rank received: raised on every rank
            raise _known_to_all(err) from None
        return meta, dict(sorted(shapes.items())), ids

    def _local(self, rows: dict[str, torch.Tensor], key: str, shapes) -> torch.Tensor:
        """This rank's rows of ``key``; zero rows of the agreed shape if it computed none."""
        if key in rows:
            return rows[key]
        shape, dtype = shapes[key]
        return torch.zeros((0, *shape), dtype=dtype, device=self.device)

    def _collect(self, local: torch.Tensor, length: int) -> list[torch.Tensor] | None:
        """Every rank's ``local (n_rank, ...)`` padded to ``length`` rows, where ``to`` asks."""
        padded = torch.zeros((length, *local.shape[1:]), dtype=local.dtype, device=self.comm)
        padded[: local.shape[0]] = local
        if self.to == "all":
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded)
            return parts
        parts = (
            [torch.empty_like(padded) for _ in range(self.world)] if self.rank == self.to else None
        )
        dist.gather(padded, parts, dst=self.to)
        return parts

    def _all_gather_object(self, obj: Any) -> list[Any]:
        return _all_gather_object(obj, self.world, self.comm)


def _best_of(merged: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The ``k`` best of every rank's candidates ``(candidates, N_query, ...)`` per query, as
    :meth:`Sharding.merge_top` returns them."""
    out = {}
    for side, largest in (("most", True), ("least", False)):
        values = merged[f"{side}_tracin"]  # (candidates, N_query)
        best = values.topk(k, dim=0, largest=largest).indices  # (k, N_query)
        sdi = merged[f"{side}_sdi"]
        out[f"{side}_indices"] = merged[f"{side}_indices"].gather(0, best).T
        out[f"{side}_tracin"] = values.gather(0, best).T
        out[f"{side}_sdi"] = sdi.gather(0, best[..., None].expand(-1, -1, sdi.shape[2]))
        out[f"{side}_sdi"] = out[f"{side}_sdi"].transpose(0, 1)
    return out


def _row_ids(counts: list[list[int]], world: int, name: str) -> list[torch.Tensor]:
    """Per rank, the train-loader row of each of its rows, from every rank's batch sizes."""
    n_batches = sum(len(c) for c in counts)
    owned = [len(range(r, n_batches, world)) for r in range(world)]
    if [len(c) for c in counts] != owned:
        raise ValueError(
            f"ranks featurised {[len(c) for c in counts]} batches of {name}, but batch i "
            f"belongs to rank i % {world}: every rank must iterate the same {name}"
        )
    ids: list[list[torch.Tensor]] = [[] for _ in range(world)]
    start = 0
    for b in range(n_batches):
        n = counts[b % world][b // world]
        ids[b % world].append(torch.arange(start, start + n))
        start += n
    _require_rows(start, name)
    return [torch.cat(i) if i else torch.zeros(0, dtype=torch.int64) for i in ids]


class LocalSharding:
    """A process that runs alone: the interface of :class:`Sharding`, doing nothing.

    It owns every batch, has no other rank to tell of a failure, and its "gathered" results are its
    own (``gather_to`` is ignored), checked only for not being empty.
    """

    rank, world = 0, 1
    may_own_no_batch = False  # it owns every batch: an empty train loader is an error
    store_identity: dict[str, Any] = {}  # one process's stores carry no shard entry

    def __init__(self, name: str = "train_loader"):
        self.name = name

    def store_folder(self, folder: Path) -> Path:
        return folder

    def require_receiver(self, what: str) -> None:
        """Nothing to refuse: one process receives its own results whatever ``gather_to`` says."""

    def owned(self, loader: Iterable[Any]) -> Iterable[Any]:
        return loader

    def check_same(self, fields: dict[str, Any]) -> None:
        """Nothing to compare with."""

    def fail(self, error: BaseException) -> None:
        """Nothing to do: no other rank waits for this one."""

    def total(self, n: int) -> int:
        return n

    def gather(
        self, rows: dict[str, torch.Tensor], counts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        _require_rows(sum(counts), self.name)
        return rows

    def merge_top(
        self, top: dict[str, torch.Tensor], k: int, counts: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        _require_rows(sum(counts), self.name)
        return top


def _require_rows(n_rows: int, name: str) -> None:
    if n_rows == 0:
        raise ValueError(f"{name} yielded no batches")


def sharding_of(
    loader: Iterable[Any], device: torch.device, to: GatherTo, name: str = "train_loader"
) -> Sharding | LocalSharding:
    """The :class:`Sharding` of one call, or a :class:`LocalSharding` when the process runs alone.

    ``loader`` is the loader to split (the train loader; ``featurize_loader``'s loader), ``device``
    the features' device, ``to`` who receives results (``gather_to`` of the estimators), ``name``
    the loader's name in error messages.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return LocalSharding(name)
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        raise ValueError(
            f"{name} uses a DistributedSampler, but sdi shards it itself (batch i goes to rank "
            "i % world_size): give every rank the same, unsplit loader"
        )
    if not (to is None or to == "all" or (isinstance(to, int) and 0 <= to < world)):
        raise ValueError(f"gather_to must be a rank in [0, {world}), 'all' or None, got {to!r}")
    device = torch.device(device)
    backend = dist.get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            "the process group runs NCCL, which cannot gather CPU features: initialise it with "
            "'gloo' (or 'cpu:gloo,cuda:nccl'), or put the model on the GPU"
        )
    comm = torch.device("cpu") if backend == "gloo" else device
    return Sharding(rank, world, device, comm, to, name)
