"""The hook manager: module calls on the timeline, and the uses of module-level rules.

One path for every use: capture -> use -> rule -> feature. Uses at the operation come from
:mod:`sdi.capture`; a module served by a module-level rule (:mod:`sdi.selection`: Opacus-covered
types, registered rules, the generic rule) has its calls hooked here instead, and each call becomes
the same kind of use, an :class:`sdi.capture.OpUse` whose function is the module. A forward hook
records the call (which module, which of its uses, where in the forward timeline) and hangs a
tensor hook (:func:`watch_grad`) on the module's output, with the use in its closure; so whenever
autograd produces the output's gradient -- in whatever order, however the graph branches, and even
if the output is later modified in place -- the callback gets ``(use, grad_output)`` for exactly
that use. Nothing is stacked, nothing is matched by order.

``grad_output`` is the gradient of the module's FIRST tensor output, the one every per-layer rule
differentiates. A gradient that reaches one of the module's other tensor outputs (say the router
logits of an MoE block feeding an auxiliary loss) would be missed by the rules, so it is an error
rather than a silently partial feature.

The log also keeps the timeline :mod:`sdi.steps` reads: every call's enter and exit tick on one clock,
for those modules and for the extra ``span_modules`` (e.g. the loop layers the user passed as
``target_modules``, which may own no parameter directly), and which buffers a call changed.

Outside :meth:`HookManager.capture` the hooks return at once and keep nothing; inside
:meth:`HookManager.paused` (a rule recomputing a forward) they record nothing either.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .capture import OpUse


MakeUse = Callable[[nn.Module, tuple, dict, int, int, torch.Tensor], "OpUse"]
GradCallback = Callable[["OpUse", torch.Tensor], None]


@dataclass
class CallLog:
    """What one forward pass did with the selected parameters.

    ``entries[key]``: one ``[enter, exit, call]`` per use of ``key`` -- a module served by a
    module-level rule (one entry per call), the module owning a parameter used by an operation, or
    ``(bank, i)`` for a slice of a bank (:mod:`sdi.capture`); operations on one key within one
    call of an enclosing module (not the model itself) are one use. ``spans[module]``: every call of
    the hooked modules, ``(enter, exit)`` on the same clock.
    """

    entries: dict = field(default_factory=dict)
    spans: dict[nn.Module, list[tuple[int, int]]] = field(default_factory=dict)
    clock: int = 0
    # module -> names of the buffers one of its calls changed (their version counter moved).
    mutated_buffers: dict[nn.Module, list[str]] = field(default_factory=dict)
    batch_sizes: set[int] = field(default_factory=set)
    used: set = field(default_factory=set)  # the parameters some use gave a gradient path

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def add_entry(self, key, enter: int, leave: int, call: int | None = None) -> int:
        """Record a use of ``key``; one within the same ``call`` as the last extends it. Its index."""
        entries = self.entries.setdefault(key, [])
        if call is not None and entries and entries[-1][2] == call:
            entries[-1][1] = leave
        else:
            entries.append([enter, leave, call])
        return len(entries) - 1


def watch_grad(out: torch.Tensor, callback) -> torch.Tensor:
    """Call ``callback(grad)`` with d loss / d ``out`` (detached, ``out``'s shape) during backward.

    Returns the tensor to hand on in place of ``out`` (``out`` itself where possible).
    Featurisation freezes every parameter, so an output that needs no grad has no grad-requiring
    input either: nothing upstream to cut, so it becomes a fresh leaf (cloned, so in-place ops
    downstream stay legal).
    """
    replacement = out
    if not out.requires_grad:
        replacement = out = out.detach().requires_grad_(True).clone()
    shape, target = out.shape, out
    if out._is_view():
        # A hook on a view dies if the view is later modified in place (e.g. nn.Linear on 3-D
        # input returns a view of a 2-D matmul, then `y += x`); a hook on its base survives.
        base = out._base
        if base.numel() == out.numel() and out.is_contiguous() and base.is_contiguous():
            target = base
        else:
            replacement = target = out.clone()

    def hook(grad: torch.Tensor) -> None:  # returns nothing: the gradient flows on unchanged
        callback(grad.detach().view(shape))

    target.register_hook(hook)
    return replacement


def _first_tensor(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o)), None)
    return None


def _buffer_versions(module: nn.Module, places: dict) -> list[tuple[str, int]]:
    """The versions of ``module``'s buffers by name. Where they are is looked up once and kept in
    ``places`` (per capture): walking the submodules at every call cost more than the rest of
    the hook."""
    found = places.get(module)
    if found is None:
        found = places[module] = [
            (f"{prefix}.{key}" if prefix else key, owner, key)
            for prefix, owner in module.named_modules()
            for key, b in owner._buffers.items()
            if b is not None
        ]
    buffers = [(name, owner._buffers.get(key)) for name, owner, key in found]
    return [(name, b._version) for name, b in buffers if b is not None]


class HookManager:
    """Forward hooks that time every call of the hooked modules and route each use of a module
    served by a module-level rule to ``on_grad``.

    Args:
        modules: the modules served by a module-level rule: each call is a use.
        on_grad: called during backward as ``on_grad(use, grad_output)``: ``use`` is the call as
            an :class:`sdi.capture.OpUse` of the module (made by ``make_use``; ``use.slots`` place
            it on the timeline), ``grad_output`` is d loss / d (first tensor output), detached.
        make_use: ``make_use(module, args, kwargs, batch_dim, batch, out)`` -> the call's ``OpUse``
            (:func:`sdi.capture.module_use`), keyword arguments of ``forward``'s
            positional parameters moved into ``args``.
        batch_dim: the batch dimension of the module outputs (0 for batch-first).
        span_modules: further modules whose calls are only timed (enter/exit ticks): the owners of
            parameters captured at the operation, and the modules enclosing them, for
            :mod:`sdi.steps`; their buffers are watched where ``owners`` holds them.
        keep_output: modules whose first call per capture keeps a copy of its first tensor output
            in :attr:`OpUse.output` (the generic rule checks its recompute against it).
        owners: the modules owning selected parameters (a change of their buffers is recorded).
        root: the model: operations directly in its forward are not grouped into one use.
        on_call, on_output: ``on_call(module, (args, kwargs))`` before each recorded call of a
            hooked module, ``on_output(module, first tensor output, the tensor handed on in its
            place)`` after it.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        on_grad: GradCallback,
        make_use: MakeUse,
        batch_dim: int = 0,
        span_modules: Sequence[nn.Module] = (),
        keep_output: Sequence[nn.Module] = (),
        owners: Sequence[nn.Module] = (),
        root: nn.Module | None = None,
        on_call: Callable[[nn.Module, tuple], None] | None = None,
        on_output: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None = None,
    ):
        self._on_grad, self._make_use = on_grad, make_use
        self._batch_dim = batch_dim
        self._log: CallLog | None = None
        self._paused = False
        self._keep_output = set(keep_output)
        # active calls: module, enter tick, buffer versions, the call's (args, kwargs)
        self._stack: list[tuple[nn.Module, int, list, tuple]] = []
        self._rule_modules = set(modules)
        self._owners = set(owners) | self._rule_modules
        self.root = root
        self._on_call, self._on_output = on_call, on_output
        self._handles: dict[nn.Module, list] = {}
        self._places: dict[nn.Module, list] = {}  # per capture: see _buffer_versions
        for m in modules:
            self._hook(m, self._forward_hook)
        for m in dict.fromkeys(span_modules):
            if m not in self._rule_modules:
                self._hook(m, self._span_hook)

    def _hook(self, module: nn.Module, post) -> None:
        # prepend: seen before any forward hook of the user changes the output
        kwargs = {"with_kwargs": True} if post == self._forward_hook else {}
        self._handles[module] = [
            module.register_forward_pre_hook(self._pre_hook, prepend=True, with_kwargs=True),
            module.register_forward_hook(post, prepend=True, **kwargs),
        ]

    def add_rule_module(self, module: nn.Module, keep_output: bool) -> None:
        """From now on, each call of ``module`` is a use served by its module-level rule."""
        for handle in self._handles.pop(module, []):
            handle.remove()
        self._rule_modules.add(module)
        self._owners.add(module)
        if keep_output:
            self._keep_output.add(module)
        self._hook(module, self._forward_hook)

    @property
    def log(self) -> CallLog:
        if self._log is None:
            raise RuntimeError("the call log exists only inside HookManager.capture()")
        return self._log

    @contextmanager
    def capture(self) -> Iterator[CallLog]:
        """Record calls and pair grads for one forward/backward; forget everything afterwards."""
        self._log = CallLog()
        self._stack = []
        self._places = {}
        try:
            yield self._log
        finally:
            self._log = None
            self._stack = []

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (a rule re-running a module's forward)."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def close(self) -> None:
        """Remove every hook."""
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles.clear()
        self._log = None

    def active(self, module: nn.Module) -> bool:
        """Whether ``module``'s forward is running now."""
        return any(m is module for m, *_ in self._stack)

    def active_any(self, modules) -> bool:
        return any(m in modules for m, *_ in self._stack)

    def calls(self) -> list[tuple[nn.Module, tuple]]:
        """The running calls of hooked modules other than the model, innermost first, each as
        ``(module, (args, kwargs))``."""
        return [(m, inputs) for m, _, _, inputs in reversed(self._stack) if m is not self.root]

    def group(self) -> int | None:
        """The enter tick of the innermost running call of a hooked module other than the model."""
        for module, enter, *_ in reversed(self._stack):
            if module is not self.root:
                return enter
        return None

    def _recording(self) -> bool:
        return self._log is not None and not self._paused and torch.is_grad_enabled()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._recording():
            versions = _buffer_versions(module, self._places) if module in self._owners else []
            self._stack.append((module, self.log.tick(), versions, (args, kwargs)))
            if self._on_call is not None:
                self._on_call(module, (args, kwargs))
        return None

    def _exit(self, module: nn.Module) -> tuple[int, int] | None:
        """``(enter, exit)`` ticks of the call now returning, or ``None`` if its entry was not seen.

        For an owner of selected parameters, also records the buffers the call changed.
        """
        index = next(
            (i for i in range(len(self._stack) - 1, -1, -1) if self._stack[i][0] is module), None
        )
        if index is None:
            return None
        _, enter, versions, _ = self._stack.pop(index)
        log = self.log
        if module in self._owners:
            before = dict(versions)
            now = _buffer_versions(module, self._places)
            changed = [n for n, version in now if before.get(n) != version]
            if changed:
                log.mutated_buffers.setdefault(module, [])
                log.mutated_buffers[module] += [
                    n for n in changed if n not in log.mutated_buffers[module]
                ]
        span = (enter, log.tick())
        log.spans.setdefault(module, []).append(span)
        return span

    def _span_hook(self, module: nn.Module, inputs: tuple, output):
        if self._recording():
            self._exit(module)
            out = _first_tensor(output)
            if out is not None and self._on_output is not None:
                self._on_output(module, out, out)
        return None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if not self._recording():
            return None
        log = self.log
        span = self._exit(module)
        out = _first_tensor(output)
        if span is None or out is None or not out.is_floating_point():
            return None
        use = log.add_entry(module, *span)
        batch = int(out.shape[self._batch_dim]) if out.dim() > self._batch_dim else 1
        log.batch_sizes.add(batch)
        op = self._make_use(module, *_bound(module, args, kwargs), self._batch_dim, batch, out)
        log.used.update(op.params)
        op.slots.update(dict.fromkeys(op.params, (module, use)))
        if use == 0 and module in self._keep_output:
            op.output = out.detach().clone()
        watched = watch_other_outputs(type(module).__name__, output, out)
        new = watch_grad(out, lambda grad: self._on_grad(op, grad))
        if self._on_output is not None:
            self._on_output(module, out, new)
        if new is out and watched is output:
            return None
        if torch.is_tensor(watched):
            return new
        return watched if new is out else _replace_first(watched, new)


def watch_other_outputs(what: str, output, first: torch.Tensor):
    """Hang a refusing hook on every other floating tensor output; returns the output to use.

    An output that needs no grad (frozen parameters, input not requiring grad) becomes a leaf
    as the first output does, so that a loss using it is still seen.
    """
    if not isinstance(output, (tuple, list)):
        return output
    items = list(output)
    for index, other in enumerate(items):
        if not torch.is_tensor(other) or other is first or not other.is_floating_point():
            continue
        if not other.requires_grad:
            other = items[index] = other.detach().requires_grad_(True).clone()

        def refuse(grad: torch.Tensor, index=index) -> None:
            if bool(grad.ne(0).any()):
                raise RuntimeError(
                    f"output {index} of {what} (a tensor beside its first output) carries a "
                    "gradient to the loss; per-example rules differentiate the first tensor "
                    "output only, so the feature would miss that path. Select the submodules "
                    "that compute that output instead, or use that output alone."
                )

        other.register_hook(refuse)
    if all(a is b for a, b in zip(items, output, strict=True)):
        return output
    if hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return type(output)(items) if isinstance(output, tuple) else items


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Keyword arguments of ``forward``'s positional parameters moved into ``args`` (in order), so
    that ``module(input=x)`` reaches the rules as ``module(x)``."""
    if not kwargs:
        return args, kwargs
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    positional, rest = [], {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            positional.extend(value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            rest.update(value)
        elif kind == inspect.Parameter.KEYWORD_ONLY or rest:
            rest[name] = value
        else:
            positional.append(value)
    return tuple(positional), rest


def _replace_first(output, new: torch.Tensor):
    items = list(output)
    index = next(i for i, o in enumerate(items) if torch.is_tensor(o))
    items[index] = new
    if hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return type(output)(items) if isinstance(output, tuple) else items
