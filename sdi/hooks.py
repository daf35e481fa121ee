"""The hook manager: pairs every use of a selected module with its own grad-output.

A forward hook on each selected module records the call (which module, which of its uses, where in
the forward timeline) and hangs a tensor hook on the module's output. The activation lives in that
tensor hook's closure, so whenever autograd produces the output's gradient -- in whatever order,
however the graph branches, and even if the output is later modified in place -- the callback gets
``(module, use, activations, grad_output)`` for exactly that use. Nothing is stacked, nothing is
matched by order.

Outside :meth:`HookManager.capture` the hooks return at once and keep nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

GradCallback = Callable[[nn.Module, int, list[torch.Tensor], torch.Tensor], None]


@dataclass
class CallLog:
    """What one forward pass did with the selected modules."""

    order: list[nn.Module] = field(default_factory=list)  # every call, in forward order
    uses: dict[nn.Module, list[int]] = field(
        default_factory=dict
    )  # module -> its positions in order
    batch_sizes: set[int] = field(default_factory=set)
    # Leaves made for outputs that did not require grad (see HookManager._forward_hook).
    leaves: list[torch.Tensor] = field(default_factory=list)


def _first_tensor(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if torch.is_tensor(o)), None)
    return None


class HookManager:
    """Forward hooks on ``modules`` that route each use's grad-output to ``on_grad``.

    Args:
        modules: the modules that own selected parameters.
        on_grad: called during backward as ``on_grad(module, use, activations, grad_output)``, where
            ``use`` counts the module's calls in forward order from 0, ``activations`` are the call's
            tensor inputs (detached) and ``grad_output`` is d loss / d output (detached).
        batch_dim: the batch dimension of the module outputs (0 for batch-first).
    """

    def __init__(self, modules: Sequence[nn.Module], on_grad: GradCallback, batch_dim: int = 0):
        self._on_grad = on_grad
        self._batch_dim = batch_dim
        self._log: CallLog | None = None
        self._handles = [m.register_forward_hook(self._forward_hook) for m in modules]

    @property
    def log(self) -> CallLog:
        if self._log is None:
            raise RuntimeError("the call log exists only inside HookManager.capture()")
        return self._log

    @contextmanager
    def capture(self) -> Iterator[CallLog]:
        """Record calls and pair grads for one forward/backward; forget everything afterwards."""
        self._log = CallLog()
        try:
            yield self._log
        finally:
            self._log = None

    def close(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._log = None

    def _forward_hook(self, module: nn.Module, inputs: tuple, output):
        log = self._log
        if log is None or not torch.is_grad_enabled():
            return None
        out = _first_tensor(output)
        if out is None or not out.is_floating_point():
            return None
        use = len(log.uses.setdefault(module, []))
        log.uses[module].append(len(log.order))
        log.order.append(module)
        log.batch_sizes.add(int(out.shape[self._batch_dim]) if out.dim() > self._batch_dim else 1)
        activations = [t.detach() for t in inputs if torch.is_tensor(t)]

        replacement = None
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
            self._on_grad(module, use, activations, grad.detach().view(shape))

        target.register_hook(on_grad)
        return replacement


def _replace_first(output, new: torch.Tensor):
    items = list(output)
    index = next(i for i, o in enumerate(items) if torch.is_tensor(o))
    items[index] = new
    if hasattr(output, "_fields"):  # namedtuple
        return type(output)(*items)
    return type(output)(items) if isinstance(output, tuple) else items
