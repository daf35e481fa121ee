"""Where the batch is in a tensor, followed by data flow through the featurisation forward.

A tensor is *per-example* when it was computed from the batch: the tensors of the batch and of the
model's call are the seeds, and every torch operation with a per-example input gives per-example
outputs. The batch dimension of an output comes from the operation, never from a size that
happens to equal the batch size:

- transposes, permutes and moves map the dimension exactly;
- views and reshapes keep it where the product of the sizes in front of it is kept (a reshape that
  merges the batch with another dimension loses it);
- ``stack`` / ``cat`` / ``einsum`` / ``__getitem__`` shift it by what they insert in front, and
  ``unbind`` / ``select`` / reductions along ``dim`` by the dimensions they remove;
- any other operation keeps it in place, counted from the left (``linear``, elementwise ops,
  reductions over later dimensions, ...), or from the right where a broadcast added leading
  dimensions -- checked against the input's own batch size.

Where none of this establishes the dimension, it is *unknown* (``None``): a parameter use that
needs it is then an error naming the operation (:mod:`sdi.capture`), never a guess. An operation
that mixes the examples (batch statistics) keeps their rows, and :func:`couples` says it mixed
them.
"""

from __future__ import annotations

import math

import torch

from .derived import RESHAPES

# Property getters arrive as fresh method-wrappers: compared with ==, not `is`.
_T = torch.Tensor.T.__get__
_MT = torch.Tensor.mT.__get__
_TRANSPOSES = {"transpose", "swapaxes", "swapdims", "transpose_"}
# Operations along a `dim` argument: along the batch dimension they mix the examples.
_ALONG = {
    "sum",
    "mean",
    "softmax",
    "log_softmax",
    "cumsum",
    "cumprod",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "norm",
    "logsumexp",
    "prod",
    "median",
    "sort",
    "argsort",
    "nansum",
    "nanmean",
    "logcumsumexp",
    "std_mean",
    "var_mean",
}
# Reshapes, broadcasts and their in-place forms: the batch dimension is followed by its size.
_RESHAPES = RESHAPES | {"expand", "expand_as", "broadcast_to", "squeeze_", "unsqueeze_"}
# The operations output_dim follows by name (and the getters .T / .mT): any other one that keeps
# its input's shape keeps the batch where it was.
_BY_NAME = (
    _TRANSPOSES
    | _RESHAPES
    | {
        "t",
        "t_",
        "permute",
        "movedim",
        "moveaxis",
        "__getitem__",
        "stack",
        "cat",
        "concat",
        "concatenate",
        "einsum",
        "__get__",
    }
)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _after_reshape(shape_in, bd: int, shape_out) -> int | None:
    """The dimension of ``shape_out`` holding ``shape_in[bd]`` whole, with the same elements in front."""
    front, size = math.prod(shape_in[:bd]), shape_in[bd]
    acc = 1
    for j, s in enumerate(shape_out):
        if acc == front and s == size:
            return j
        acc *= s
        if acc > front:
            return None
    return None


def _after_index(index, ndim: int, bd: int, B: int) -> int | None:
    """Where dimension ``bd`` lands after ``x[index]`` (basic indexing), ``None`` if it is indexed."""
    items = index if isinstance(index, tuple) else (index,)
    if any(torch.is_tensor(i) or isinstance(i, list) for i in items):
        return _after_gather(items, ndim, bd, B)
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    out_dim, in_dim = 0, 0
    for item in items:
        if item is Ellipsis:
            skip = ndim - consumed
            if in_dim <= bd < in_dim + skip:
                return out_dim + bd - in_dim
            in_dim, out_dim = in_dim + skip, out_dim + skip
        elif item is None:
            out_dim += 1
        elif isinstance(item, slice):
            if in_dim == bd:
                return out_dim if item == slice(None) else None
            in_dim, out_dim = in_dim + 1, out_dim + 1
        else:  # an integer index removes the dimension
            if in_dim == bd:
                return None
            in_dim += 1
    return out_dim + bd - in_dim


def _after_gather(items: tuple, ndim: int, bd: int, B: int) -> int | None:
    """Where dimension ``bd`` lands after ``x[items]`` with index tensors (advanced indexing), for
    slices and integer tensors only; at an indexed batch, only where its index runs over the
    examples in order along one dimension -- as in HF's padding masks,
    ``mask[arange(B)[:, None, None, None], kv[None, None, None, :]]``, or ``x[arange(B), last]``."""
    if len(items) > ndim or not all(isinstance(i, slice) or torch.is_tensor(i) for i in items):
        return None
    items = items + (slice(None),) * (ndim - len(items))
    tensors = [j for j, i in enumerate(items) if torch.is_tensor(i)]
    if any(items[j].dtype in (torch.bool, torch.uint8) for j in tensors):
        return None  # a mask selects a data-dependent number of rows
    shape = torch.broadcast_shapes(*(items[j].shape for j in tensors))
    adjacent = tensors == list(range(tensors[0], tensors[-1] + 1))
    start = tensors[0] if adjacent else 0  # where the indexed block lands (numpy's rule)
    if bd not in tensors:
        if items[bd] != slice(None):
            return None
        if adjacent and bd < start:
            return bd
        return sum(1 for j in range(bd) if j not in tensors) + len(shape)
    index = items[bd]
    varying = [k for k, n in enumerate(index.shape) if n > 1]
    if B == 1 and index.dim() > 0:  # a batch of one: its index's first dimension
        varying = [0]
    k = len(shape) - index.dim() + varying[0] if len(varying) == 1 else None
    if k is None or index.numel() != B or shape[k] != B:
        return None
    if not torch.equal(index.reshape(-1), torch.arange(B, device=index.device)):
        return None
    return start + k


def _einsum(args, dims: list[int | None]) -> int | None:
    if not isinstance(args[0], str):
        return None
    spec = args[0].replace(" ", "")
    if "->" not in spec or "." in spec:
        return None
    ins, out = spec.split("->")
    letters = set()
    for sub, bd in zip(ins.split(","), dims, strict=False):
        if bd is not None:
            letters.add(sub[bd])
    if len(letters) != 1:
        return None
    letter = letters.pop()
    return out.index(letter) if letter in out else None


def _couples(name: str, args, kwargs, nd: int, bd: int) -> bool:
    """Whether the operation mixes the examples: reduces / normalises along the batch dimension,
    or normalises with batch statistics."""
    if name == "batch_norm":
        return bool(_arg(args, kwargs, 5, "training", False))
    if name not in _ALONG:
        return False
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None or isinstance(dim, bool) or not isinstance(dim, (int, tuple, list)):
        return False
    dims = [dim] if isinstance(dim, int) else list(dim)
    return any(isinstance(d, int) and _norm(d, nd) == bd for d in dims)


def couples(func, args, kwargs, first: torch.Tensor, bd: int) -> bool:
    """Whether ``func`` mixes the examples of its per-example input ``first`` (batch on ``bd``):
    reduces or normalises along the batch, or normalises with batch statistics. Its outputs are
    then *coupled* (:mod:`sdi.capture`)."""
    return _couples(getattr(func, "__name__", ""), args, kwargs, first.dim(), bd)


def output_dim(func, args, kwargs, first: torch.Tensor, bd: int, out: torch.Tensor, B: int):
    """The batch dimension of ``out``, an output of ``func`` whose per-example input ``first``
    (the first one among the arguments) has its batch of ``B`` on ``bd``; ``None`` if unknown
    (or reduced away). An operation mixing the examples keeps their rows where they are; that it
    mixes them is :func:`couples`'s to say."""
    name = getattr(func, "__name__", "")
    nd = first.dim()
    if name in _ALONG and out.dim() == nd and _couples(name, args, kwargs, nd, bd):
        return bd  # along the batch, its dimension kept (softmax, keepdim): coupled, see couples
    if name not in _BY_NAME and out.shape == first.shape:
        return bd  # the common case (elementwise, linear to the same width): as _aligned finds
    if name in _TRANSPOSES:
        d0, d1 = (_norm(int(d), nd) for d in (args[1], args[2]))
        return d1 if bd == d0 else d0 if bd == d1 else bd
    if name in ("t", "t_") or func == _T:
        return nd - 1 - bd  # t() of a 2-D tensor, .T of any: every dimension reversed
    if func == _MT:
        return nd - 3 - bd + nd if bd >= nd - 2 else bd
    if name == "permute":
        order = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        order = [_norm(int(d), nd) for d in order]
        return order.index(bd)
    if name in ("movedim", "moveaxis"):
        src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [d for d in range(nd) if d not in [_norm(s, nd) for s in src]]
        for s, d in sorted(
            zip((_norm(x, nd) for x in src), (_norm(y, nd) for y in dst), strict=True),
            key=lambda sd: sd[1],
        ):
            order.insert(d, s)
        return order.index(bd)
    if name in _RESHAPES:
        return _after_reshape(tuple(first.shape), bd, tuple(out.shape))
    if name == "__getitem__":
        return _after_index(args[1], nd, bd, B)
    if name == "stack":
        dim = _norm(int(_arg(args, kwargs, 1, "dim", 0)), nd + 1)
        return bd + 1 if dim <= bd else bd
    if name in ("cat", "concat", "concatenate"):
        dim = _norm(int(_arg(args, kwargs, 1, "dim", 0)), nd)
        return None if dim == bd else bd
    if name == "einsum":
        return None  # resolved by the caller, which sees every operand's dimension
    removed = _removed(name, args, kwargs, nd) if out.dim() < nd else None
    if removed is not None and len(removed) == nd - out.dim():
        return None if bd in removed else bd - sum(d < bd for d in removed)
    return _aligned(first, bd, out, B)


def _removed(name: str, args, kwargs, nd: int) -> list[int] | None:
    """The dimensions ``unbind`` / ``select`` / a reduction along ``dim`` removes (``None``: not
    one of those, or not known): a dimension removed in front of the batch moves it."""
    if name in ("unbind", "select"):
        dim = _arg(args, kwargs, 1, "dim", 0)
    elif name in _ALONG or name in ("argmax", "argmin", "any", "all", "count_nonzero"):
        dim = _arg(args, kwargs, 1, "dim")
    else:
        return None
    dims = [dim] if isinstance(dim, int) else dim
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return sorted({_norm(d, nd) for d in dims})


def _aligned(first: torch.Tensor, bd: int, out: torch.Tensor, B: int) -> int | None:
    """Same place counted from the left, else from the right (a broadcast added leading dims)."""
    size = first.shape[bd]
    if out.dim() > bd and out.shape[bd] == size:
        return bd
    right = bd + out.dim() - first.dim()
    if 0 <= right < out.dim() and out.shape[right] == size:
        return right
    return None


einsum_dim = _einsum
