"""The hook manager: pairs every use of a selected module with its own grad-output.

A forward hook on each selected module records the call (which module, which of its uses, where in
the forward timeline) and hangs a tensor hook on the module's output. The call's arguments --
positional and keyword, as a :class:`Call` -- live in that tensor hook's closure, so whenever autograd
produces the output's gradient -- in whatever order, however the graph branches, and even if the
output is later modified in place -- the callback gets ``(module, use, call, grad_output)`` for
exactly that use. Nothing is stacked, nothing is matched by order.

``grad_output`` is the gradient of the module's FIRST tensor output, the one every per-layer rule
differentiates. A gradient that reaches one of the module's other tensor outputs (say the router
logits of an MoE block feeding an auxiliary loss) would be missed by the rules, so it is an error
rather than a silently partial feature.

The log also keeps the timeline :mod:`sdi.steps` reads: every call's enter and exit tick on one clock,
for the selected modules and for the extra ``span_modules`` (e.g. the loop layers the user passed as
``target_modules``, which may own no parameter directly), and which buffers a call changed.

Outside :meth:`HookManager.capture` the hooks return at once and keep nothing; inside
:meth:`HookManager.paused` (a rule recomputing a forward) they record nothing either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class Call:
    """One call's arguments, every tensor in them detached (batch on the manager's ``batch_dim``)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor | None = None  # a copy of the first tensor output, when asked for

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The positional tensor arguments: what the Linear / Embedding / Opacus rules read."""
        return [a for a in self.args if torch.is_tensor(a)]


GradCallback = Callable[[nn.Module, int, Call, torch.Tensor], None]


@dataclass
class CallLog:
    """What one forward pass did with the selected modules."""

    order: list[nn.Module] = field(default_factory=list)  # every call, in forward (exit) order
    uses: dict[nn.Module, list[int]] = field(
        default_factory=dict
    )  # module -> its positions in order
    # module -> (enter tick, exit tick) of each use, one clock for all modules; span modules too.
    spans: dict[nn.Module, list[tuple[int, int]]] = field(default_factory=dict)
    clock: int = 0
    # module -> names of the buffers one of its calls changed (their version counter moved).
    mutated_buffers: dict[nn.Module, list[str]] = field(default_factory=dict)
    batch_sizes: set[int] = field(default_factory=set)
    # Leaves made for outputs that did not require grad (see HookManager._forward_hook).
    leaves: list[torch.Tensor] = field(default_factory=list)

    def tick(self) -> int:
        self.clock += 1
        return self.clock


def _first_tensor(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o)), None)
    return None


def _detached(tree):
    return tree_map(lambda x: x.detach() if torch.is_tensor(x) else x, tree)


def _buffer_versions(module: nn.Module) -> list[tuple[str, int]]:
    return [(name, b._version) for name, b in module.named_buffers()]


class HookManager:
    """Forward hooks on ``modules`` that route each use's grad-output to ``on_grad``.

    Args:
        modules: the modules that own selected parameters.
        on_grad: called during backward as ``on_grad(module, use, call, grad_output)``, where
            ``use`` counts the module's calls in forward order from 0, ``call`` holds the call's
            arguments (detached) and ``grad_output`` is d loss / d (first tensor output), detached.
        batch_dim: the batch dimension of the module outputs (0 for batch-first).
        span_modules: further modules whose calls are only timed (enter/exit ticks), for
            :mod:`sdi.steps`.
        keep_output: modules whose first call per capture keeps a copy of its first tensor output
            in :attr:`Call.output` (the generic rule checks its recompute against it).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        on_grad: GradCallback,
        batch_dim: int = 0,
        span_modules: Sequence[nn.Module] = (),
        keep_output: Sequence[nn.Module] = (),
    ):
        self._on_grad = on_grad
        self._batch_dim = batch_dim
        self._log: CallLog | None = None
        self._paused = False
        self._keep_output = set(keep_output)
        self._entered: dict[nn.Module, list[tuple[int, list]]] = {}
        self._handles = []
        self._owners = set(modules)
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            self._handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))
        for m in dict.fromkeys(span_modules):
            if m in self._owners:
                continue
            self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            self._handles.append(m.register_forward_hook(self._span_hook))

    @property
    def log(self) -> CallLog:
        if self._log is None:
            raise RuntimeError("the call log exists only inside HookManager.capture()")
        return self._log

    @contextmanager
    def capture(self) -> Iterator[CallLog]:
        """Record calls and pair grads for one forward/backward; forget everything afterwards."""
        self._log = CallLog()
        self._entered = {}
        try:
            yield self._log
        finally:
            self._log = None
            self._entered = {}

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
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._log = None

    def _recording(self) -> bool:
        return self._log is not None and not self._paused and torch.is_grad_enabled()

    def _pre_hook(self, module: nn.Module, inputs: tuple):
        if self._recording():
            versions = _buffer_versions(module) if module in self._owners else []
            self._entered.setdefault(module, []).append((self.log.tick(), versions))
        return None

    def _exit(self, module: nn.Module, *, owner: bool) -> tuple[int, int] | None:
        """``(enter, exit)`` ticks of the call now returning, or ``None`` if its entry was not seen.

        For an ``owner`` of selected parameters, also records the buffers the call changed.
        """
        stack = self._entered.get(module)
        if not stack:
            return None
        enter, versions = stack.pop()
        log = self.log
        if not owner:
            return enter, log.tick()
        before = dict(versions)
        changed = [n for n, now in _buffer_versions(module) if before.get(n) != now]
        if changed:
            log.mutated_buffers.setdefault(module, [])
            log.mutated_buffers[module] += [
                n for n in changed if n not in log.mutated_buffers[module]
            ]
        return enter, log.tick()

    def _span_hook(self, module: nn.Module, inputs: tuple, output):
        if self._recording():
            span = self._exit(module, owner=False)
            if span is not None:
                self.log.spans.setdefault(module, []).append(span)
        return None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if not self._recording():
            return None
        log = self.log
        span = self._exit(module, owner=True)
        out = _first_tensor(output)
        if span is None or out is None or not out.is_floating_point():
            return None
        use = len(log.uses.setdefault(module, []))
        log.uses[module].append(len(log.order))
        log.order.append(module)
        log.spans.setdefault(module, []).append(span)
        log.batch_sizes.add(int(out.shape[self._batch_dim]) if out.dim() > self._batch_dim else 1)
        kept = out.detach().clone() if use == 0 and module in self._keep_output else None
        call = Call(_detached(tuple(args)), _detached(dict(kwargs)), kept)
        watched = self._watch_other_outputs(module, output, out)
        replacement = None if watched is output else watched
        output = watched
        if not out.requires_grad:
            # Featurisation freezes every parameter so that backward computes no weight gradient.
            # An output that then needs no grad has no grad-requiring input either: nothing upstream
            # to cut, so it becomes a fresh leaf (cloned, so in-place ops downstream stay legal).
            leaf = out.detach().requires_grad_(True)
            log.leaves.append(leaf)
            out = leaf.clone()
            replacement = out if torch.is_tensor(output) else _replace_first(output, out)

        shape, target = out.shape, out
        if out._is_view():
            # A hook on a view dies if the view is later modified in place (e.g. nn.Linear on 3-D
            # input returns a view of a 2-D matmul, then `y += x`); a hook on its base survives.
            base = out._base
            if base.numel() == out.numel() and out.is_contiguous() and base.is_contiguous():
                target = base
            else:
                out = target = out.clone()
                replacement = out if torch.is_tensor(output) else _replace_first(output, out)

        def on_grad(grad: torch.Tensor) -> None:
            self._on_grad(module, use, call, grad.detach().view(shape))

        target.register_hook(on_grad)
        return replacement

    def _watch_other_outputs(self, module: nn.Module, output, first: torch.Tensor):
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
                leaf = other.detach().requires_grad_(True)
                self.log.leaves.append(leaf)
                other = items[index] = leaf.clone()

            def refuse(grad: torch.Tensor, index=index) -> None:
                if bool(grad.ne(0).any()):
                    raise RuntimeError(
                        f"output {index} of {type(module).__name__} (a tensor beside its first "
                        "output) carries a gradient to the loss; per-example rules differentiate "
                        "the first tensor output only, so the feature would miss that path. "
                        "Select the submodules that compute that output instead."
                    )

            other.register_hook(refuse)
        if all(a is b for a, b in zip(items, output, strict=True)):
            return output
        if hasattr(output, "_fields"):  # namedtuple
            return type(output)(*items)
        return type(output)(items) if isinstance(output, tuple) else items


def _replace_first(output, new: torch.Tensor):
    items = list(output)
    index = next(i for i, o in enumerate(items) if torch.is_tensor(o))
    items[index] = new
    if hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return type(output)(items) if isinstance(output, tuple) else items
