"""Where the sequence positions are in a tensor, followed by data flow (for :mod:`sdi.explain`).

``explain`` splits every use's grad-output by position. Which dimension of a use's output holds the
positions is followed through the forward exactly as the batch dimension is (:mod:`sdi.batchdims`):
the batch's tensors are the seeds -- positions on the dimension after the batch (before it, for a
sequence-first batch) -- and every operation maps it to its outputs. Attention's ``(B, H, T, dh)``
layout, a transpose, a permute keep track of it; a sum over the positions, or a reshape that merges
them with another dimension, loses it, and a use whose output has no known position dimension is
an error in ``explain`` rather than a split along whatever dimension comes second.

Where the data flow loses them inside a hooked module's call (HF's ``Conv1D`` views its input as
``(B * T, d)`` and back), the call's output gets them back where the call kept its input's layout --
as many dimensions, the positions' size on the same one -- the contract every module call is held
to, as for the batch (:func:`sdi.capture.settle_output`); see :class:`Calls`.

Only followed while ``explain`` featurises (:class:`sdi.capture.CaptureMode` with ``positions``).
"""

from __future__ import annotations

import torch

from .batchdims import einsum_dim, output_dim

# Attribute of a per-example tensor: (capture token, position dim or None).
_POS = "_sdi_pos"
_CATS = ("cat", "concat", "concatenate")


def seed(token: object, tensors, batch_dim: int) -> None:
    """The batch's tensors: positions next to the batch (``(B, T, ...)`` or ``(T, B, ...)``)."""
    for t in tensors:
        if t.dim() >= 2 and batch_dim <= 1:
            setattr(t, _POS, (token, 1 - batch_dim))


def position_of(token: object, t: torch.Tensor) -> int | None:
    """The position dimension of ``t``, ``None`` where it has none or it is not known."""
    mark = getattr(t, _POS, None)
    return mark[1] if mark is not None and mark[0] is token else None


def copy(token: object, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst`` stands for ``src`` (a leaf or clone handed on in its place)."""
    mark = getattr(src, _POS, None)
    if mark is not None and mark[0] is token:
        setattr(dst, _POS, mark)


class Calls:
    """The running calls of hooked modules: where each one's first input with positions had them."""

    def __init__(self, token: object):
        self.token = token
        self._entered: dict = {}  # module -> a stack of (dim, ndim, size) or None, one per call

    def enter(self, module, tensors) -> None:
        found = None
        for t in tensors:
            dim = position_of(self.token, t)
            if dim is not None:
                found = (dim, t.dim(), t.shape[dim])
                break
        self._entered.setdefault(module, []).append(found)

    def settle(self, module, out: torch.Tensor, leave: bool) -> None:
        """``out``, the first output of ``module``'s running call: its positions where the data
        flow lost them and the call kept its input's layout. ``leave``: the call is over."""
        calls = self._entered.get(module)
        entry = (calls.pop() if leave else calls[-1]) if calls else None
        if entry is None or position_of(self.token, out) is not None:
            return
        dim, ndim, size = entry
        if out.dim() == ndim and out.shape[dim] == size:
            setattr(out, _POS, (self.token, dim))


def tag(token: object, func, args, kwargs, inputs, outs: list) -> None:
    """Mark ``outs``, the tensor outputs of ``func``, with the position dimension that the first
    per-example input with positions among ``inputs`` maps to (``None``: not known)."""
    first, found = None, None
    for t in inputs:
        dim = position_of(token, t)
        if dim is not None:
            first, found = t, _maps_to(token, func, args, kwargs, t, dim, outs[0])
            break
    for o in outs:
        if o is not first or found is not None:  # an in-place output keeps what it had
            setattr(o, _POS, (token, found))


def _maps_to(token, func, args, kwargs, first: torch.Tensor, dim: int, out) -> int | None:
    name = getattr(func, "__name__", "")
    if name == "einsum":
        return _einsum(token, args)
    found = output_dim(func, args, kwargs, first, dim, out, int(first.shape[dim]))
    if found is None and name in _CATS and _cat_dim(args, kwargs, first.dim()) == dim:
        return dim  # more positions (a prefix, a memory): still the positions
    return found


def _einsum(token: object, args) -> int | None:
    """Where the first operand with positions has them (attention's ``"bhqd,bhkd->bhqk"`` has
    positions in two operands: the queries', the first, are the output's)."""
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    dims = [position_of(token, o) if torch.is_tensor(o) else None for o in operands]
    first = next((i for i, d in enumerate(dims) if d is not None), None)
    return einsum_dim(args, [d if i == first else None for i, d in enumerate(dims)])


def _cat_dim(args, kwargs, ndim: int) -> int:
    dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0))
    return dim + ndim if dim < 0 else dim
