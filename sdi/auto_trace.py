"""The one forward pass that ``target_modules="auto"`` reads: module calls and parameter uses.

:class:`CallTrace` puts a forward pre-hook and a forward hook on every module and keeps

- each module's calls made while gradients are enabled, as ``(enter, exit)`` ticks on one clock
  (iterations under ``torch.no_grad()`` leave no gradient and are no step);
- which modules *computed with parameters* during a call: an operation inside the call (in the
  module's own code or its children's) took a trainable parameter, or a tensor computed from
  parameters alone (``bank[i]``, ``w.T``, ``w.to(x.dtype)``, ``w / w.norm()``), together with a
  tensor that is not (an activation, token ids). The module need not own that parameter: a block
  passed bank slices or a parent's weight computes with them.

The second is seen at the operation by a ``torch.overrides.TorchFunctionMode``, the way
:mod:`sdi.capture` sees uses, but with no per-example bookkeeping: detection only asks *whether*
a call used parameters.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


@dataclass
class Timeline:
    """What :func:`sdi.steps.plan_steps` reads of a forward pass (as :class:`sdi.hooks.CallLog`
    holds it): ``spans[module]`` its calls' (enter, exit) ticks; ``entries`` is filled by the
    caller with the keys it plans."""

    entries: dict = field(default_factory=dict)
    spans: dict[nn.Module, list[tuple[int, int]]] = field(default_factory=dict)
    clock: int = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock


class _ParamUses(TorchFunctionMode):
    """Marks the open module calls whose operations compute with parameters."""

    def __init__(self, trace: CallTrace, params: list[nn.Parameter]):
        super().__init__()
        self._trace = trace
        self._params = {id(p): p for p in params}
        # id -> weak reference of a tensor computed from parameters alone (an id can be reused
        # once its tensor is freed: the reference tells).
        self._derived: dict[int, weakref.ref] = {}

    def _marked(self, t: torch.Tensor) -> bool:
        key = id(t)
        if self._params.get(key) is t:
            return True
        ref = self._derived.get(key)
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        marked = [self._marked(t) for t in tensors]
        if not any(marked):
            return out
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if all(marked):  # parameters alone in, parameters alone out: a slice, a cast, a norm
            for t in outputs:
                self._derived[id(t)] = weakref.ref(t)
        elif outputs and torch.is_grad_enabled():  # parameters meet the data: a use
            self._trace.computing.update(self._trace.stack)
        return out


class CallTrace:
    """Hooks on every module of ``model`` and a :class:`_ParamUses` mode, while entered."""

    def __init__(self, model: nn.Module):
        self.log = Timeline()
        self.stack: list[nn.Module] = []  # the module calls open now (grad-enabled ones)
        self.computing: set[nn.Module] = set()  # modules whose calls computed with parameters
        self._open: dict[nn.Module, list[int]] = {}
        self._handles = []
        self._mode = _ParamUses(self, [p for p in model.parameters() if p.requires_grad])
        for module in model.modules():
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args) -> None:
        if torch.is_grad_enabled():
            self._open.setdefault(module, []).append(self.log.tick())
            self.stack.append(module)

    def _leave(self, module: nn.Module, args, output) -> None:
        opened = self._open.get(module)
        if not opened:  # entered under no_grad (or before the hooks were added)
            return
        enter = opened.pop()
        self.stack.reverse()  # close the innermost open call of this module
        self.stack.remove(module)
        self.stack.reverse()
        self.log.spans.setdefault(module, []).append((enter, self.log.tick()))

    def __enter__(self) -> CallTrace:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
