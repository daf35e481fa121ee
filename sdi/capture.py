"""Capture at the operation: every torch operation that computes with a parameter is a *use*.

A :class:`CaptureMode` (a ``torch.overrides.TorchFunctionMode``) is active during the featurisation
forward. It sees every torch function and tensor method, and keeps two kinds of marks:

- tensors computed from parameters alone (``w``, ``bank[i]``, ``w.to(x.dtype)``, a weight norm's
  weight): :class:`sdi.derived.Derived`, which know how to recompute themselves from the
  parameters;
- per-example tensors (computed from the batch), with the dimension of their batch
  (:mod:`sdi.batchdims`), and whether batch statistics coupled their examples.

An operation that meets both -- a parameter-derived tensor and a per-example one -- is a use: its
arguments are recorded (detached), a tensor hook on its first output pairs the use with its own
grad-output (:func:`sdi.hooks.watch_grad`), and :mod:`sdi.rules.ops` turns the pair into the
per-example gradients of the parameters behind it. Operations with neither mark run untouched after
one scan of their arguments.

Which uses count is the featuriser's :class:`Scope`: uses of selected parameters anywhere, except
inside a call of a module that a module-level rule serves them by; a use of any other trainable
parameter inside a selected module's call is *found* (:mod:`sdi.uses`). Such a module's call is a
use too -- :func:`module_use`, the same :class:`OpUse` with the module as its function -- so every
rule sees one kind of object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import positions
from .batchdims import couples, einsum_dim, output_dim
from .derived import GETTERS, Derived, Step, template
from .positions import Calls

# Attribute of a per-example tensor: (capture token, batch dim or None, coupled), coupled when
# computed with batch statistics (a batch norm in training, a mean over the batch): its row of one
# example depends on the other examples.
_TAG = "_sdi_batch"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Operand:
    """A parameter-derived argument of a use."""

    derived: Derived
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Batched:
    """A per-example argument of a use: ``tensor`` (detached) with its batch on ``dim``."""

    tensor: torch.Tensor
    dim: int
    version: int


@dataclass(eq=False)
class OpUse:
    """One use: ``func(*args, **kwargs)`` with :class:`Operand` / :class:`Batched` leaves.

    ``func`` is a torch function, or a module whose call a module-level rule serves (its own
    parameters are then implicit: ``params`` are some of them). ``params``: the parameters whose
    per-example gradients it gives; ``slots[p] = (key, entry)`` place it on the timeline
    (:mod:`sdi.steps`); ``out_dim``: the batch dim of its first output; ``output``: a copy of
    that output, kept for rules that check a recompute against it; ``pos_dim``: the position dim
    of its first output where positions are followed (:mod:`sdi.positions`), else ``None``.
    """

    func: Callable
    args: tuple
    kwargs: dict
    params: tuple[nn.Parameter, ...]
    out_dim: int
    slots: dict = field(default_factory=dict)
    output: torch.Tensor | None = None
    pos_dim: int | None = None

    @property
    def module(self) -> nn.Module | None:
        """The module, when this use is a call served by a module-level rule."""
        return self.func if isinstance(self.func, nn.Module) else None

    @property
    def name(self) -> str:
        if self.module is not None:
            return type(self.func).__name__
        return getattr(self.func, "__qualname__", None) or getattr(self.func, "__name__", "op")

    def release(self) -> None:
        """Drop the recorded arguments once the use's features are computed: held to the end of
        the backward pass, they would keep every input activation alive that autograd frees as
        it goes, and the next batch's allocations would fault in fresh pages."""
        self.args, self.kwargs, self.output = (), {}, None

    def check_unchanged(self) -> None:
        """Refuse a per-example argument changed in place since the forward recorded it."""
        for x in (*self.args, *self.kwargs.values()):
            for y in x if isinstance(x, (list, tuple)) else (x,):
                if isinstance(y, Batched) and y.tensor._version != y.version:
                    raise RuntimeError(
                        f"an input of {self.name} was modified in place after the forward used "
                        "it; its per-example gradient would read the modified values. Compute "
                        "the modification out of place"
                    )


def tag(x, token: object, dim: int | None) -> int:
    """Mark every tensor in ``x`` as per-example with its batch on ``dim``; how many."""
    tensors = [t for t in tree_flatten(x)[0] if torch.is_tensor(t)]
    for t in tensors:
        setattr(t, _TAG, (token, dim, False))
    return len(tensors)


def _inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in (
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
    )


def _replay_on_copy(func):
    """An in-place ``func`` replayed on a copy of its first argument (never on a parameter)."""

    def run(first, *args, **kwargs):
        first = first.clone()
        func(first, *args, **kwargs)
        return first

    run.__name__ = getattr(func, "__name__", "inplace")
    return run


class Scope:
    """What the mode asks the featuriser: which parameters, which uses count, where on the clock.

    Subclassed by the featuriser; the defaults count nothing.
    """

    def param_of(self, t: torch.Tensor) -> nn.Parameter | None:
        return None

    def owner(self, p: nn.Parameter) -> nn.Module | None:
        return None

    def names(self, params) -> list[str]:
        return [str(tuple(p.shape)) for p in params]

    def counts(self, p: nn.Parameter, func) -> bool:
        """Whether a use of ``p`` by ``func`` here counts (raises for a use that cannot count)."""
        return False

    def watch_others(self, what: str, out, first: torch.Tensor):
        """``out`` with a refusing grad hook on each tensor beside ``first`` (see
        :func:`sdi.hooks.watch_other_outputs`)."""
        return out

    def unknown(self, params, message: str) -> None:
        """A use of ``params`` whose per-example structure is not known: raises."""
        raise RuntimeError(message)

    def coupled(self, params, message: str) -> None:
        """A use of ``params`` on a tensor computed with batch statistics: raises where that is
        refused (strict mode)."""
        raise RuntimeError(message)

    def record(self, use: OpUse, out: torch.Tensor, keys: dict) -> torch.Tensor:
        """Place ``use`` on the timeline and watch its grad; returns the output to hand on."""
        return out


class CaptureMode(TorchFunctionMode):
    """Tracks parameter-derived and per-example tensors; hands every use to ``scope``."""

    def __init__(self, scope: Scope, derivations: dict | None = None, positions: bool = False):
        super().__init__()
        self.scope = scope
        self.positions = positions  # follow the positions too (sdi.positions, for explain)
        self.token = object()
        self.calls = Calls(self.token) if positions else None  # hooked calls' input positions
        self.batch_size: int | None = None  # of the seeds
        self._derived: dict[int, tuple[torch.Tensor, Derived]] = {}
        # Derivations by their key (the parameter, then each step's function and constant
        # arguments): one object for each way the model computes from a parameter, shared by
        # the batches of a featuriser (``derivations`` kept across modes), so that its shortcuts
        # are worked out once (sdi.derived).
        self._derivations = {} if derivations is None else derivations

    def seed(self, x, dim: int) -> int:
        """Mark the tensors in ``x`` (the batch, the model's arguments) as per-example; how many.
        The first one with a dimension ``dim`` gives :attr:`batch_size`."""
        tensors = [t for t in tree_flatten(x)[0] if torch.is_tensor(t)]
        if self.batch_size is None:
            self.batch_size = next((int(t.shape[dim]) for t in tensors if t.dim() > dim), None)
        if self.positions:
            positions.seed(self.token, tensors, dim)
        return tag(tensors, self.token, dim)

    def _lookup(self, t: torch.Tensor):
        hit = self._derived.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        p = self.scope.param_of(t)
        if p is None:
            return None
        derived = self._derivations.get((p,))
        if derived is None:
            derived = self._derivations[(p,)] = Derived((p,), key=(p,))
        self._derived[id(t)] = (t, derived)
        return derived

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracked, batched = [], []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                self._scan(a, tracked, batched)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor):
                        self._scan(b, tracked, batched)
        if not tracked and not batched:
            return func(*args, **kwargs)
        if not tracked:
            out = func(*args, **kwargs)
            self._tag_outputs(func, args, kwargs, batched, out)
            return out
        if not batched:
            return self._derive(func, args, kwargs, tracked)
        return self._use(func, args, kwargs, tracked, batched)

    def _scan(self, t: torch.Tensor, tracked: list, batched: list) -> None:
        mark = getattr(t, _TAG, None)
        if mark is not None and mark[0] is self.token:
            batched.append((t, mark[1]))
            return
        derived = self._lookup(t)
        if derived is not None:
            tracked.append((t, derived))

    def _tag_outputs(self, func, args, kwargs, batched, out) -> int | None:
        """Mark ``out`` per-example; returns the batch dim of its first tensor (``None``: unknown)."""
        first, dim = batched[0]
        if isinstance(out, torch.Tensor):
            outs = [out]
        elif not isinstance(out, (tuple, list)) or type(out) is torch.Size:  # fast out
            return None
        elif any(isinstance(o, (tuple, list, dict)) for o in out):
            outs = [o for o in tree_flatten(out)[0] if torch.is_tensor(o)]
        else:
            outs = [o for o in out if isinstance(o, torch.Tensor)]
        if not outs:
            return None
        coupled = any(getattr(t, _TAG)[2] for t, _ in batched)
        if dim is None or any(d is None for _, d in batched):
            found = None
        elif getattr(func, "__name__", "") == "einsum":
            operands = (
                args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            )
            by_id = {id(t): d for t, d in batched}
            found = einsum_dim(args, [by_id.get(id(o)) for o in operands])
        else:
            found = output_dim(func, args, kwargs, first, dim, outs[0], int(first.shape[dim]))
            coupled = coupled or couples(func, args, kwargs, first, dim)
        for o in outs:
            if o is not first or found is not None:
                setattr(o, _TAG, (self.token, found, coupled))
        if self.positions:
            positions.tag(self.token, func, args, kwargs, [t for t, _ in batched], outs)
        return found

    def _derive(self, func, args, kwargs, tracked):
        """An operation on parameter-derived tensors alone: its outputs are derived too."""
        name = getattr(func, "__name__", "")
        if name == "__get__" and not any(func == g for g in GETTERS):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        inplace = _inplace(func)
        if out is tracked[0][0] and len(tracked) == 1 and not inplace:
            return out  # a no-op (``w.to(w.dtype)``, ``w.contiguous()``): nothing new to track
        step_func = _replay_on_copy(func) if inplace else func
        if (
            len(tracked) == 1
            and len(tracked[0][1].params) == 1
            and args
            and args[0] is tracked[0][0]
        ):
            before, derived, known = tracked[0][1], None, self._derivations  # built per output
            make = lambda index: _then(known, before, func, step_func, args, kwargs, index)  # noqa: E731
        else:
            derived = _combined(step_func, args, kwargs, tracked)
            make = lambda index: derived if index is None else _pick(derived, index)  # noqa: E731
        target = args[0] if inplace and args and torch.is_tensor(args[0]) else out
        if torch.is_tensor(target):
            if target.dtype in _FLOAT:
                self._derived[id(target)] = (target, make(None))
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if torch.is_tensor(o) and o.dtype in _FLOAT:
                    self._derived[id(o)] = (o, make(i))
        return out

    def _use(self, func, args, kwargs, tracked, batched):
        params = {}  # a dict: tensors compare by identity there
        for _, derived in tracked:
            for p in derived.params:
                if p not in params and self.scope.counts(p, func):
                    params[p] = None
        params = list(params)
        if not params or not torch.is_grad_enabled():
            out = func(*args, **kwargs)
            self._tag_outputs(func, args, kwargs, batched, out)
            if not torch.is_grad_enabled() or _inplace(func) or not _fresh_float(out):
                return out
            # A frozen parameter's use counted nowhere (an unselected embedding): its output
            # starts the activation graph here, in the forward and in a checkpoint's recompute.
            leaf = out.detach().requires_grad_(True).clone()
            if hasattr(out, _TAG):
                setattr(leaf, _TAG, getattr(out, _TAG))
            positions.copy(self.token, out, leaf)
            return leaf
        for t, dim in batched:
            if dim is None:
                self.scope.unknown(params, _unknown(func, params, t, self.scope))
        if any(getattr(t, _TAG)[2] for t, _ in batched):
            self.scope.coupled(params, _coupled(func, params, self.scope))
        ids = {id(t): d for t, d in tracked}
        dims = {id(t): d for t, d in batched}
        mutated = args[0] if _inplace(func) and args and id(args[0]) in dims else None

        def record(x):
            if not torch.is_tensor(x):
                return x
            if id(x) in ids:
                return Operand(ids[id(x)], tuple(x.shape))
            if id(x) in dims:
                kept = x.detach().clone() if x is mutated else x.detach()
                return Batched(kept, dims[id(x)], kept._version)
            return x.detach()

        rec_args, rec_kwargs = _map(record, args), {k: _map1(record, v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        out_dim = self._tag_outputs(func, args, kwargs, batched, out)
        first = (
            out
            if isinstance(out, torch.Tensor)
            else next((o for o in tree_flatten(out)[0] if torch.is_tensor(o)), None)
        )
        if first is None or first.dtype not in _FLOAT:
            raise RuntimeError(
                f"{_op_name(func)} uses {self.scope.names(params)} but returns no "
                "floating-point tensor to differentiate"
            )
        if out_dim is None:
            self.scope.unknown(params, _unknown(func, params, first, self.scope, output=True))
        pos = positions.position_of(self.token, first) if self.positions else None
        use = OpUse(func, rec_args, rec_kwargs, tuple(params), out_dim, pos_dim=pos)
        keys = {p: _key(p, tracked, self.scope) for p in params}
        out = self.scope.watch_others(_op_name(func), out, first)
        replaced = self.scope.record(use, first, keys)
        if replaced is first:
            return out
        tag(replaced, self.token, out_dim)
        positions.copy(self.token, first, replaced)
        if torch.is_tensor(out):
            return replaced
        items, spec = tree_flatten(out)
        items[next(i for i, o in enumerate(items) if o is first)] = replaced
        return tree_unflatten(items, spec)


def settle_output(mode: CaptureMode, out: torch.Tensor, new: torch.Tensor, dim: int) -> int | None:
    """After a module's call: the batch dimension of its output ``out`` by the data flow (``None``:
    unknown, or not per-example), passed on to ``new``, the tensor handed on in its place (a
    leaf, a clone). Where the data flow lost it (an MoE block's routed tokens summed back) and
    ``out`` has the batch's size on the declared dimension ``dim``, it is that dimension again --
    the layout every module call is held to -- so the modules after the block see it."""
    mark = getattr(out, _TAG, None)
    if mark is None or mark[0] is not mode.token:
        return None
    if mark[1] is None and out.dim() > dim and out.shape[dim] == mode.batch_size:
        mark = (mark[0], dim, mark[2])
    setattr(out, _TAG, mark)
    if new is not out:
        setattr(new, _TAG, mark)
        positions.copy(mode.token, out, new)
    return mark[1]


def inputs_usable(mode: CaptureMode, inputs, dim: int) -> bool:
    """Whether a module call's ``inputs`` can be split into examples: at least one per-example
    tensor, and each with its batch dimension known -- or lost by the data flow but of the
    batch's size on the declared dimension ``dim`` (see :func:`module_use`)."""
    found = False
    for t in tree_flatten(inputs)[0]:
        mark = getattr(t, _TAG, None) if isinstance(t, torch.Tensor) else None
        if mark is None or mark[0] is not mode.token:
            continue
        if mark[1] is None and not (t.dim() > dim and t.shape[dim] == mode.batch_size):
            return False
        found = True
    return found


def module_use(
    mode: CaptureMode,
    module: nn.Module,
    params,
    args: tuple,
    kwargs: dict,
    out_dim: int,
    batch: int,
    out: torch.Tensor,
) -> OpUse:
    """A call of ``module`` served by a module-level rule, as an :class:`OpUse` of the module;
    its first output ``out`` has ``batch`` examples on ``out_dim`` (the featuriser's declared
    layout).

    Which arguments are per-example is known from the data flow, as for operations. A
    per-example argument whose batch dimension the data flow lost (downstream of an MoE's
    token routing: ``x.reshape(-1, d)``, gathers by routed rows, ``index_add``) is taken on
    the declared dimension where it has ``batch`` rows there -- the contract every module
    call is held to, and strict mode checks the rule's recompute against the forward --
    and refused by name otherwise.
    """

    def record(x):
        if not torch.is_tensor(x):
            return x
        mark = getattr(x, _TAG, None)
        if mark is None or mark[0] is not mode.token:
            return x.detach()
        dim = mark[1]
        if dim is None and x.dim() > out_dim and x.shape[out_dim] == batch:
            dim = out_dim
        if dim is None:
            mode.scope.unknown(params, _unknown(module, params, x, mode.scope))
        return Batched(x.detach(), dim, x._version)

    rec_args = tuple(tree_map(record, a) for a in args)
    rec_kwargs = {k: tree_map(record, v) for k, v in kwargs.items()}
    pos = positions.position_of(mode.token, out) if mode.positions else None
    return OpUse(module, rec_args, rec_kwargs, tuple(params), out_dim, pos_dim=pos)


def _then(derivations: dict, before: Derived, func, step_func, args, kwargs, index) -> Derived:
    """``before`` followed by ``step_func`` (``func``, or its replay on a copy): one object per
    derivation of a parameter by constant arguments, kept in ``derivations`` across batches."""
    step = (func, step_func is not func, _constant_key(args[1:], kwargs), index)
    if before.key is None or step[2] is None:
        return before.then(Step(step_func, *template(args, kwargs, 0), index))
    derived = derivations.get(before.key + (step,))
    if derived is None:
        if len(derivations) > _MAX_DERIVATIONS:  # constants that vary by batch
            derivations.clear()
        derived = before.then(Step(step_func, *template(args, kwargs, 0), index), step)
        derivations[derived.key] = derived
    return derived


class _NotConstant(Exception):
    pass


_MAX_DERIVATIONS = 4096
_CONSTANT_TYPES = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


def _constant(x):
    """``x`` as a hashable key, its type kept (``x[True]`` is not ``x[1]``); raises
    :class:`_NotConstant` for a tensor or anything else that may change between calls."""
    if x is None or x is Ellipsis:
        return x
    if isinstance(x, float):
        return (float, repr(x))  # -0.0 is not 0.0; nan equals itself
    if isinstance(x, _CONSTANT_TYPES):
        return (type(x), x)
    if isinstance(x, slice):
        return (slice, _constant(x.start), _constant(x.stop), _constant(x.step))
    if isinstance(x, (tuple, list)):
        return (type(x), *(_constant(y) for y in x))
    raise _NotConstant


def _constant_key(args: tuple, kwargs: dict):
    """A key for a step's arguments beside its input, ``None`` where they are not constants."""
    try:
        return _constant(args), _constant(sorted(kwargs.items()))
    except _NotConstant:
        return None


def _fresh_float(out) -> bool:
    """A floating-point tensor that needs no grad and is no view (so it has no alias to keep)."""
    return (
        isinstance(out, torch.Tensor)
        and out.dtype in _FLOAT
        and not out.requires_grad
        and not out._is_view()
    )


def _map1(fn, x):
    """``fn`` on ``x``, or on each item of a list / tuple ``x`` (one level, as torch functions take)."""
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(fn(y) for y in x)
    return tree_map(fn, x) if isinstance(x, dict) else fn(x)


def _map(fn, args: tuple) -> tuple:
    return tuple(_map1(fn, a) for a in args)


def _combined(func, args, kwargs, tracked) -> Derived:
    """A tensor computed from several parameter-derived tensors."""
    params = tuple(dict.fromkeys(p for _, d in tracked for p in d.params))
    by_id = {id(t): d for t, d in tracked}
    leaves, spec = tree_flatten((args, kwargs))
    frozen = [x.detach() if torch.is_tensor(x) and id(x) not in by_id else x for x in leaves]
    sources = {
        i: by_id[id(x)] for i, x in enumerate(leaves) if torch.is_tensor(x) and id(x) in by_id
    }

    def combine(values: dict) -> torch.Tensor:
        filled = [sources[i].value(values) if i in sources else x for i, x in enumerate(frozen)]
        a, k = tree_unflatten(filled, spec)
        return func(*a, **k)

    return Derived(params, combine=combine)


def _pick(derived: Derived, index: int) -> Derived:
    return Derived(derived.params, combine=lambda v: derived.value(v)[index])


def _key(p: nn.Parameter, tracked, scope: Scope):
    """Timeline key: ``(p, i)`` for a slice ``bank[i]``, else the module owning ``p``."""
    for _, derived in tracked:
        if any(p is q for q in derived.params):
            i = derived.slice_index
            if i is not None:
                return (p, i)
    return scope.owner(p)


def _op_name(func) -> str:
    if isinstance(func, nn.Module):
        return type(func).__name__
    return getattr(func, "__name__", None) or str(func)


def _coupled(func, params, scope) -> str:
    return (
        f"{_op_name(func)} uses {scope.names(params)} on a tensor computed with batch statistics "
        "(a batch norm in training mode, a mean or softmax over the batch): one example's result "
        "depends on the other examples, so its per-example gradient is not defined in strict mode "
        "(call model.eval(), or pass strict=False to take the batch's values as given)"
    )


def _unknown(func, params, t, scope, output: bool = False) -> str:
    what = "its output" if output else "a per-example argument"
    return (
        f"{_op_name(func)} uses {scope.names(params)}, but the batch dimension of {what} (shape "
        f"{tuple(t.shape)}) cannot be established from the data flow (a reshape merged the batch "
        "with another dimension, or an operation sdi does not follow moved it). Keep the batch a "
        "dimension of its own up to this operation, or select other parameters"
    )
