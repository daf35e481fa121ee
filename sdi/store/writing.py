"""The write path of a store, inside one catalogue transaction: whether to append, the block, completion."""

from __future__ import annotations

import torch

from .catalogue import BatchEntry, Catalogue, CatalogueState
from .errors import DELETE_HINT, StoreError, StoreMismatchError
from .packed import DataFiles
from .verify import checksum


def must_write(
    catalogue: Catalogue, state: CatalogueState, index: int, fingerprint: str | None
) -> bool:
    """Whether batch ``index`` is to be written (``False``: another writer stored it first and its
    block is adopted). Raises :class:`StoreMismatchError` if that writer stored another batch or
    the store is complete, :class:`CorruptCatalogueError` if batches vanished from the catalogue."""
    root = catalogue.root
    if state.stored > index:  # another writer was faster: keep its block
        theirs = catalogue.entry(index).fingerprint
        if fingerprint is not None and theirs is not None and theirs != fingerprint:
            raise StoreMismatchError(
                root,
                f"another process stored a different train batch {index}: two runs with other "
                "train loaders share this folder",
            )
        return False
    if state.stored < index:
        raise catalogue.corrupt(
            f"lists {state.stored} batches, fewer than the {index} this process read before: it "
            "was rewritten by something else"
        )
    if state.complete:
        raise StoreMismatchError(
            root,
            f"it is complete with {index} train batches, but the train loader yields more; pass "
            f"another folder or {DELETE_HINT.format(root=root)}",
        )
    return True


def write_block(
    catalogue: Catalogue,
    files: DataFiles,
    file_bytes: int,
    index: int,
    features: torch.Tensor,
    steps: int,
    fingerprint: str | None,
) -> None:
    """Write ``features`` (any shape, stored as float32) as batch ``index``'s block at the end of
    the current data file (a new one past ``file_bytes``), then its catalogue entry."""
    array = features.detach().to("cpu", torch.float32).contiguous().numpy()
    data = memoryview(array.reshape(-1).view("u1"))
    current = catalogue.current_file()
    if current is None or (current[1] > 0 and current[1] + len(data) > file_bytes):
        name, end = catalogue.add_file(), 0
        files.retire(keep=name)  # the full file's last blocks go to the disk
    else:
        name, end = current
    files.write(name, end, data)  # in the OS's cache before the entry commits
    entry = BatchEntry(
        index, name, end, len(data), int(array.shape[0]), int(steps), tuple(array.shape),
        array.dtype.str, checksum(data, index), fingerprint,
    )  # fmt: skip
    catalogue.put(entry, end + len(data))


def check_finish(root, state: CatalogueState, batches: int | None, allow_empty: bool) -> int:
    """The number of batches to mark the store complete with; raises if that is not allowed."""
    batches = state.stored if batches is None else batches
    if batches == 0 and not allow_empty:
        raise StoreError(
            root,
            "the train loader yielded no batches: nothing is stored and the store is not marked "
            "complete",
        )
    if batches != state.stored:
        raise StoreMismatchError(
            root,
            f"it holds {state.stored} batches, but the train loader yielded {batches} batches; "
            f"pass another folder or {DELETE_HINT.format(root=root)}",
        )
    if state.complete and state.batches != batches:
        raise StoreMismatchError(
            root, f"it was completed with {state.batches} batches, now {batches}"
        )
    return batches
