"""Where the batch is in a tensor, followed by data flow through the featurisation forward.

A tensor is *per-example* when it was computed from the batch: the tensors of the batch and of the
model's call are the seeds, and every torch operation with a per-example input gives per-example
outputs. The batch dimension of an output comes from the operation, never from a size that
happens to equal the batch size:

- transposes, permutes and moves map the dimension exactly;
- views and reshapes keep it where the product of the sizes in front of it is kept (a reshape that
  merges the batch with another dimension loses it);
- ``stack`` / ``cat`` / ``einsum`` / ``__getitem__`` shift it by what they insert in front;
- any other operation keeps it in place, counted from the left (``linear``, elementwise ops,
  reductions over later dimensions, ...), or from the right where a broadcast added leading
  dimensions -- checked against the input's own batch size.

Where none of this establishes the dimension, it is *unknown* (``None``): a parameter use that
needs it is then an error naming the operation (:mod:`sdi.capture`), never a guess.
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


def _after_index(index, ndim: int, bd: int) -> int | None:
    """Where dimension ``bd`` lands after ``x[index]`` (basic indexing), ``None`` if it is indexed."""
    items = index if isinstance(index, tuple) else (index,)
    if any(torch.is_tensor(i) or isinstance(i, list) for i in items):
        return None  # advanced indexing moves dimensions around: not followed
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


def output_dim(func, args, kwargs, first: torch.Tensor, bd: int, out: torch.Tensor, B: int):
    """The batch dimension of ``out``, an output of ``func`` whose per-example input ``first``
    (the first one among the arguments) has its batch of ``B`` on ``bd``; ``None`` if unknown --
    also where the operation mixes the examples (a softmax, sum or batch norm along the batch):
    no per-example structure is left."""
    name = getattr(func, "__name__", "")
    nd = first.dim()
    if _couples(name, args, kwargs, nd, bd):
        return None
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
        return _after_index(args[1], nd, bd)
    if name == "stack":
        dim = _norm(int(_arg(args, kwargs, 1, "dim", 0)), nd + 1)
        return bd + 1 if dim <= bd else bd
    if name in ("cat", "concat", "concatenate"):
        dim = _norm(int(_arg(args, kwargs, 1, "dim", 0)), nd)
        return None if dim == bd else bd
    if name == "einsum":
        return None  # resolved by the caller, which sees every operand's dimension
    return _aligned(first, bd, out, B)


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
