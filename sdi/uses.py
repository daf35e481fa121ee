"""Which captured uses count, and where they go: the featuriser's :class:`sdi.capture.Scope`.

- A use of a selected parameter counts wherever it happens -- except inside a call of its own
  module when a module-level rule serves that module (the module hook reports that use, so it is
  not counted twice).
- A use of any other trainable parameter inside a call of a selected module (a bank's slice
  passed into a selected block, a tied weight, a parent's parameter) counts too. Such a parameter
  is *found* by the first forward pass that uses it: :class:`Found` stops that pass, the
  featuriser adds the parameter to its layout and runs the batch again; from then on its uses
  inside selected calls count (and only those).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .capture import OpUse, Scope
from .hooks import HookManager, watch_grad, watch_other_outputs


class Found(Exception):
    """Raised during a forward: ``param`` is used inside a selected module's call, unselected."""

    def __init__(self, param: nn.Parameter):
        super().__init__(f"found a parameter of shape {tuple(param.shape)} in use")
        self.param = param


class ModuleFallback(Exception):
    """Raised during a forward: ``module``'s parameters go to its module-level generic rule."""

    def __init__(self, module: nn.Module, message: str):
        super().__init__(message)
        self.module = module


class ParamScope(Scope):
    """Args:
    names: every parameter of the model -> its name.
    selected: the selected parameters.
    owners: every parameter -> the (first) module registering it.
    module_rule_owner: selected parameter -> its module, where a module-level rule serves it.
    targets: the selected modules.
    hooks: the featuriser's hook manager (which calls are running, the clock).
    on_grad: ``on_grad(use, grad)`` during backward.
    strict: refuse uses on tensors computed with batch statistics (:meth:`coupled`).
    """

    def __init__(
        self,
        names: dict,
        selected: set,
        owners: dict,
        module_rule_owner: dict,
        targets: set,
        hooks: HookManager,
        on_grad: Callable[[OpUse, torch.Tensor], None],
        strict: bool = True,
    ):
        self._by_id = {id(p): p for p in names}
        self._names, self.selected, self._owners = names, selected, owners
        self.module_rule_owner, self.targets = module_rule_owner, targets
        self.hooks, self._on_grad, self.strict = hooks, on_grad, strict
        self.trainable: set[int] = set()  # ids of the parameters trainable before featurising
        self.found: set = set()  # parameters found in use inside selected calls
        self.frozen_layout = False  # set once a batch's features were computed
        self._module_names: dict | None = None
        self._parents: dict | None = None
        # (args, kwargs) -> whether a call can be split into examples (set by the featuriser)
        self.inputs_usable: Callable[[tuple], bool] = lambda inputs: False

    def param_of(self, t: torch.Tensor) -> nn.Parameter | None:
        p = self._by_id.get(id(t))
        return p if p is t else None

    def owner(self, p: nn.Parameter) -> nn.Module | None:
        return self._owners.get(p)

    def key_name(self, key) -> str:
        """How the step plan shows a timeline key: a module's name, or ``bank[i]``."""
        if isinstance(key, tuple):
            return f"{self._names.get(key[0], '?')}[{key[1]}]"
        if self._module_names is None:
            self._module_names = {m: n or "<model>" for n, m in self.hooks.root.named_modules()}
        return self._module_names.get(key, type(key).__name__)

    def names(self, params) -> list[str]:
        return [self._names.get(p, "?") for p in params]

    def counts(self, p: nn.Parameter, func) -> bool:
        if p in self.selected:
            owner = self.module_rule_owner.get(p)
            return owner is None or not self.hooks.active(owner)
        inside = self.hooks.active_any(self.targets)
        if p in self.found:
            return inside
        if inside and id(p) in self.trainable:
            if self.frozen_layout:
                name = self._names.get(p, "?")
                raise RuntimeError(
                    f"parameter {name!r} is used by {getattr(func, '__name__', func)} inside a "
                    "call of a selected module, but no earlier batch used it there, and the "
                    "feature layout is fixed once features were computed. Select it from the "
                    f"start: pass the parameter itself (model.{name}) in target_modules"
                )
            raise Found(p)
        return False

    def unknown(self, params, message: str) -> None:
        """Where a running call of a module can be split into examples (:attr:`inputs_usable`)
        and the parameters are its own or its submodules', the innermost such module is served
        by the generic module-level rule instead: raises :class:`ModuleFallback` for the
        featuriser to redo the batch; else a ``RuntimeError``."""
        owners = {self._owners.get(p) for p in params}
        for module, inputs in self.hooks.calls():
            if all(self._within(o, module) for o in owners) and self.inputs_usable(inputs):
                raise ModuleFallback(module, message)
        raise RuntimeError(message)

    def _within(self, owner: nn.Module | None, module: nn.Module) -> bool:
        """Whether ``owner`` is ``module`` or one of its submodules."""
        if self._parents is None:
            self._parents = {c: m for m in self.hooks.root.modules() for c in m.children()}
        while owner is not None and owner is not module:
            owner = self._parents.get(owner)
        return owner is module

    def coupled(self, params, message: str) -> None:
        """Strict mode refuses a use on a tensor computed with batch statistics -- unless the
        parameters are a module's own and its call is running: then the generic rule serves the
        module (:meth:`unknown`), whose per-example recompute accepts a call that reproduces
        (batch statistics computed before it) and refuses one that does not."""
        if self.strict:
            self.unknown(params, message)

    def watch_others(self, what: str, out, first: torch.Tensor):
        return watch_other_outputs(what, out, first)

    def record(self, use: OpUse, out: torch.Tensor, keys: dict) -> torch.Tensor:
        log = self.hooks.log
        tick, group = log.tick(), self.hooks.group()
        entries: dict = {}  # one entry per key and use (F.linear's weight and bias: one use)
        for p in use.params:
            key = keys[p]
            if key not in entries:
                entries[key] = log.add_entry(key, tick, tick, group)
            use.slots[p] = (key, entries[key])
        log.used.update(use.params)
        log.batch_sizes.add(int(out.shape[use.out_dim]))
        return watch_grad(out, lambda grad: self._on_grad(use, grad))
