"""Tensors computed from parameters alone, and how a gradient w.r.t. one maps back onto them.

During the featurisation forward, ``bank[i]``, ``w.to(x.dtype)``, ``w.t()``, a weight norm's
``g * v / |v|`` or a positional table's lookup are computed from parameters with no per-example
input: they are not uses yet. Each is a :class:`Derived`: which parameters, and the recorded steps
that recompute it from them. A use's gradient w.r.t. such a tensor maps back onto the parameters by
the vjp of those steps (:meth:`Derived.backprop`); the common shapes have shortcuts:

- *plain*: casts and reshapes of one parameter -- the gradient is reshaped;
- *element picks*: indexing, slicing, transposes, expands (and casts) of one parameter -- the
  gradient is scatter-added back, each element to the parameter entry it came from
  (:meth:`Derived.element_sources`), far cheaper than a vmapped vjp per use;
- a *matrix view* (:func:`matrix_view`): a row block and column block of one parameter seen as a
  matrix ``(prod(shape[:-1]), shape[-1])`` -- ``bank[i]``, ``w[:d]``, ``w.t()``, casts of those --
  which the Linear and Embedding rules sketch with the matching rows of the parameter's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn as nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

# Property getters arrive as fresh method-wrappers: compared with ==, not `is`.
_T = torch.Tensor.T.__get__
_MT = torch.Tensor.mT.__get__
_DATA = torch.Tensor.data.__get__
GETTERS = (_T, _MT, _DATA)  # the getters followed through parameters (others are not tracked)


class Slot:
    """Marks where the recorded step's input goes in its arguments."""


SLOT = Slot()

_CASTS = {
    "to",
    "float",
    "half",
    "bfloat16",
    "double",
    "type",
    "type_as",
    "contiguous",
    "clone",
    "detach",
}
# Same elements in the same order, another shape: a gradient maps back through them by a reshape.
RESHAPES = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
# Picks, moves and repeats of elements: a gradient maps back through them by a scatter-add.
_PICKS = RESHAPES | {
    "__getitem__",
    "select",
    "unbind",
    "narrow",
    "chunk",
    "split",
    "index_select",
    "t",
    "transpose",
    "swapaxes",
    "swapdims",
    "permute",
    "movedim",
    "moveaxis",
    "flip",
    "roll",
    "diagonal",
    "expand",
    "expand_as",
    "broadcast_to",
    "repeat",
    "tile",
}


@dataclass(frozen=True)
class Step:
    """``func(*args, **kwargs)`` with the previous value at :data:`SLOT`; ``index`` picks one output."""

    func: Callable
    args: tuple
    kwargs: dict
    index: int | None = None

    @property
    def name(self) -> str:
        return getattr(self.func, "__name__", "")

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        args = tuple(value if a is SLOT else a for a in self.args)
        out = self.func(*args, **self.kwargs)
        return out if self.index is None else out[self.index]


@dataclass(eq=False)
class Derived:
    """A tensor computed from ``params`` alone: ``value(values)`` recomputes it from their values.

    One parameter: ``steps`` replay it from the parameter. Several: ``combine`` recomputes it from
    ``{param: value}``.
    """

    params: tuple[nn.Parameter, ...]
    steps: tuple[Step, ...] = ()
    combine: Callable[[dict], torch.Tensor] | None = None
    # (param, step keys...) when the steps' arguments are constants: the same derivation in the
    # next batch is this object again (sdi.capture), so the shortcuts below are worked out once.
    key: tuple | None = field(default=None, repr=False)

    def value(self, values: dict) -> torch.Tensor:
        if self.combine is not None:
            return self.combine(values)
        x = values[self.params[0]]
        for step in self.steps:
            x = step.apply(x)
        return x

    def then(self, step: Step, key: tuple | None = None) -> Derived:
        """This followed by ``step``; ``key``: the step's key (its function and constant
        arguments), where this derivation has a key too."""
        if self.combine is None:
            full = self.key + (key,) if self.key is not None and key is not None else None
            return Derived(self.params, self.steps + (step,), key=full)
        return Derived(self.params, combine=lambda v, f=self.combine: step.apply(f(v)))

    @cached_property
    def plain(self) -> bool:
        """Casts and reshapes of one parameter: a gradient maps back by a reshape."""
        if self.combine is not None:
            return False
        for step in self.steps:
            if step.name in _CASTS or step.name in RESHAPES or step.func == _DATA:
                continue
            if step.name == "__getitem__" and _trivial_index(step.args[1]):
                continue
            return False
        return True

    def element_sources(self) -> torch.Tensor | None:
        """For one parameter and steps that only pick, move or repeat its elements (indexing,
        views, transposes, expands; casts): the flat index in the parameter of each element of
        this tensor (int64, this tensor's shape), so that a gradient maps back by a scatter-add.
        ``None`` for any other step. Kept per device: a derivation is reused across batches
        (:class:`sdi.capture.CaptureMode`)."""
        if self.combine is not None:
            return None
        p = self.params[0]
        kept = self.__dict__.get("_sources")
        if kept is None or kept[0] != p.device:
            kept = self.__dict__["_sources"] = (p.device, self._element_sources(p))
        return kept[1]

    def _element_sources(self, p: nn.Parameter) -> torch.Tensor | None:
        x = torch.arange(p.numel(), device=p.device).view(p.shape)
        for step in self.steps:
            if step.name in _CASTS or step.func == _DATA:
                continue  # never moves an element (int64 indices must not be cast)
            if step.name not in _PICKS and step.func not in (_T, _MT):
                return None
            if any(isinstance(a, torch.dtype) for a in step.args):
                return None  # ``view(dtype)`` reinterprets bits: no element picks
            x = step.apply(x)
        return x

    @cached_property
    def block(self) -> MatrixView | None:
        """The block of its parameter this is, when it is one (:func:`matrix_view`)."""
        return matrix_view(self)

    @cached_property
    def slice_index(self) -> int | None:
        """``i`` when this is ``bank[i]`` (first step an integer index of a parameter of >= 2 dims):
        the timeline shows each slice of a bank on its own."""
        if self.combine is not None or not self.steps or self.params[0].dim() < 2:
            return None
        first = self.steps[0]
        if first.name == "__getitem__" and isinstance(first.args[1], int):
            return first.args[1] % self.params[0].shape[0]
        if first.name == "select" and _int(first.args[1]) == 0:
            return _int(first.args[2]) % self.params[0].shape[0]
        if first.name == "unbind" and first.index is not None and _int(first.args[1:2] or 0) == 0:
            return first.index
        return None

    def backprop(self, grad: torch.Tensor, wanted) -> dict[nn.Parameter, torch.Tensor]:
        """Per-example gradients ``(B, *param.shape)`` fp32 of ``wanted`` params from ``grad``
        ``(B, *self's shape)``, the per-example gradients w.r.t. this tensor."""
        B = grad.shape[0]
        wanted = set(wanted)
        if self.plain:
            p = self.params[0]
            return {p: grad.reshape(B, *p.shape).float()} if p in wanted else {}
        sources = self.element_sources()
        if sources is not None:  # pure element picks: scatter-add, no vmapped vjp
            p = self.params[0]
            if p not in wanted:
                return {}
            out = torch.zeros(B, p.numel(), dtype=torch.float32, device=grad.device)
            out.index_add_(1, sources.reshape(-1), grad.reshape(B, -1).float())
            return {p: out.reshape(B, *p.shape)}
        values = {p: p.detach() for p in self.params}
        order = [p for p in self.params if p in wanted]
        rest = {p: v for p, v in values.items() if p not in wanted}

        def recompute(*vals):
            return self.value({**rest, **dict(zip(order, vals, strict=True))})

        out, pull = vjp(recompute, *(values[p] for p in order))
        grads = vmap(pull)(grad.to(out.dtype))
        return {p: g.float() for p, g in zip(order, grads, strict=True)}


def _int(x) -> int | None:
    if isinstance(x, (tuple, list)):
        x = x[0] if x else 0
    return int(x) if isinstance(x, int) else None


def _trivial_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in items)


def template(args: tuple, kwargs: dict, position: int):
    """``args`` / ``kwargs`` with their tensors detached and ``args[position]`` replaced by SLOT."""
    args = tuple(SLOT if i == position else a for i, a in enumerate(args))
    detach = lambda x: x.detach() if torch.is_tensor(x) else x  # noqa: E731
    return tree_map(detach, args), tree_map(detach, kwargs)


@dataclass(frozen=True)
class MatrixView:
    """Rows ``r0:r1`` and columns ``c0:c1`` of ``param`` seen as ``(prod(shape[:-1]), shape[-1])``;
    ``transposed``: the tensor is that block's transpose."""

    param: nn.Parameter
    r0: int
    r1: int
    c0: int
    c1: int
    transposed: bool

    @property
    def whole(self) -> bool:
        rows = math.prod(self.param.shape[:-1])
        full = (self.r0, self.r1, self.c0, self.c1) == (0, rows, 0, self.param.shape[-1])
        return full and not self.transposed and self.param.dim() == 2


def _index_items(step: Step, lead: list[int]) -> list | None:
    """The integer / slice indices a step applies to the leading dims, ``None`` if not one of them."""
    if step.name == "__getitem__":
        items = step.args[1] if isinstance(step.args[1], tuple) else (step.args[1],)
        if all(isinstance(i, (int, slice)) for i in items):
            return list(items)
        return None
    if step.name == "select" and _int(step.args[1]) == 0:
        return [_int(step.args[2])]
    if step.name == "unbind" and step.index is not None and _int(step.args[1:2] or 0) == 0:
        return [step.index]
    return None


def matrix_view(derived: Derived) -> MatrixView | None:
    """The block of its parameter that ``derived`` is, when it is one (see the module docstring)."""
    if derived.combine is not None or derived.params[0].dim() < 2:
        return None
    p = derived.params[0]
    lead, r0, c0, c1 = list(p.shape[:-1]), 0, 0, p.shape[-1]
    transposed = False
    for step in derived.steps:
        if step.name in _CASTS or step.func == _DATA:
            continue
        if step.name in ("t", "transpose", "swapaxes") or step.func == _T:
            if len(lead) != 1:
                return None
            transposed = not transposed
            continue
        items = _index_items(step, lead)
        if items is None or transposed:
            return None
        pos = 0  # the leading dim the next index applies to
        for item in items:
            if pos < len(lead):
                if item == slice(None):
                    pos += 1
                    continue
                if pos > 0:
                    return None  # indexing a later leading dim: the rows are not one block
                size, inner = lead[0], math.prod(lead[1:])
                if isinstance(item, int):
                    r0 += (item % size) * inner
                    lead.pop(0)
                    continue
                start, stop, stride = item.indices(size)
                if stride != 1:
                    return None
                r0, lead[0], pos = r0 + start * inner, stop - start, 1
            elif isinstance(item, slice) and pos == len(lead):
                start, stop, stride = item.indices(c1 - c0)
                if stride != 1:
                    return None
                c0, c1, pos = c0 + start, c0 + stop, pos + 1
            else:
                return None
    if len(lead) != 1:
        return None
    return MatrixView(p, r0, r0 + lead[0], c0, c1, transposed)
