"""The rule registry: which :class:`ModuleRule` computes the per-example gradients of a module.

:func:`rule_for` looks a module up in this order:

1. a rule registered (:func:`register_rule`) for the module's exact type;
2. Opacus: any type with a grad sampler in ``GradSampleModule.GRAD_SAMPLERS`` (so Opacus'
   ``register_grad_sampler`` keeps working) -> :class:`~sdi.rules.opacus.OpacusRule`, except
   ``nn.Linear`` and ``nn.Embedding`` (:data:`OPERATION_RULES`: their operations' rules serve them);
3. a rule registered for a base class, if the module's type does not override that base's
   ``forward`` (an ``nn.Linear`` subclass with its own forward is not a Linear);
4. :class:`~sdi.rules.generic.GenericRule`, for any module with direct parameters -- which the
   featuriser takes as "no module-level rule": such a module's parameters are captured at the
   operation (:mod:`sdi.selection`), unless the generic rule is registered for its type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..sketch import CountSketchHash, TensorSketchHash, draw_count_sketch

if TYPE_CHECKING:
    from ..capture import OpUse


@dataclass(frozen=True)
class Use:
    """One use of a module, as its rule sees it.

    ``activations``: the call's positional tensor arguments, the per-example ones batch first.
    ``grad``: d loss / d (first tensor output), batch first, already scaled to per-example losses.
    ``op``: the call itself (:class:`sdi.capture.OpUse`: which arguments are per-example, on which
    dimension), for rules that re-run the module's forward.
    """

    activations: list[torch.Tensor]
    grad: torch.Tensor
    op: OpUse | None = None

    @property
    def batch(self) -> int:
        return int(self.grad.shape[0])


class ModuleRule:
    """Per-example gradients of one kind of module, and how the projected estimator sketches them.

    A rule sees the *direct* parameters of one module (``params``, in ``module.parameters(recurse=
    False)`` order, only the selected ones) and one :class:`Use` at a time. Subclasses implement
    :meth:`grads`; the defaults below then sketch by CountSketch of the flattened gradient, which is
    right for any parameter whose rule has no cheaper sketch. ``rules`` / ``sums`` are the
    :class:`~sdi.rules.modes.SketchRules` and :class:`~sdi.rules.modes.StepSums` of the estimator
    (hash tables, backend, reused buffers).
    """

    #: The featuriser keeps a copy of each module's first output per batch for :meth:`grads`
    #: (a rule that recomputes the forward checks itself against it in strict mode).
    keeps_output = False

    def check(self, module: nn.Module, param: nn.Parameter, *, exact: bool) -> str | None:
        """Why ``param`` of ``module`` cannot be computed by this rule, or ``None`` if it can."""
        return None

    def draw_table(
        self, module: nn.Module, param: nn.Parameter, m: int, generator: torch.Generator
    ) -> CountSketchHash | TensorSketchHash:
        """``param``'s hash table, drawn from ``generator`` (the order of draws is the seed's contract)."""
        return draw_count_sketch(param.numel(), m, generator)

    def grads(
        self, module: nn.Module, params: Sequence[nn.Parameter], use: Use
    ) -> list[torch.Tensor]:
        """The exact per-example gradient of this use: one ``(B, param.numel())`` fp32 per param."""
        raise NotImplementedError(f"{type(self).__name__} has no exact per-example gradient")

    def sketch(self, rules, module: nn.Module, params, use: Use) -> list[torch.Tensor]:
        """One ``(B, m)`` fp32 sketch per param."""
        return [
            rules.sketch_flat(p, g)
            for p, g in zip(params, self.grads(module, params, use), strict=True)
        ]

    def add_step(self, sums, module: nn.Module, params, use: Use) -> None:
        """Add this use to the pass's step sums: by default its dense gradients, hashed once per pass."""
        for p, g in zip(params, self.grads(module, params, use), strict=True):
            sums.add_grad(p, g)


RULES: dict[type, ModuleRule] = {}

#: Types whose calls are served by the rules of their operations (:mod:`sdi.rules.ops`:
#: ``F.linear`` as ``G^T A``, ``F.embedding`` by a shift), which are exact and cheaper than
#: Opacus' samplers for them; a rule registered for one of these types still takes precedence.
OPERATION_RULES = (nn.Linear, nn.Embedding)


def register_rule(module_type: type, rule: ModuleRule | type[ModuleRule] | None = None):
    """Use ``rule`` for modules of ``module_type`` (and subclasses that keep its ``forward``).

    ``rule`` may be an instance or a :class:`ModuleRule` subclass (instantiated with no
    arguments). Without ``rule``, returns a class decorator::

        @sdi.register_rule(MyNorm)
        class MyNormRule(sdi.ModuleRule): ...

    Registering again replaces the earlier rule. Returns the rule (the class, for the decorator).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule needs an nn.Module subclass, got {module_type!r}")
    if rule is None:

        def decorator(cls):
            register_rule(module_type, cls)
            return cls

        return decorator
    instance = rule() if isinstance(rule, type) else rule
    if not isinstance(instance, ModuleRule):
        raise TypeError(f"a rule must be a ModuleRule, got {type(instance).__name__}")
    RULES[module_type] = instance
    return rule


def rule_for(module: nn.Module) -> ModuleRule:
    """The rule that computes ``module``'s per-example gradients (lookup order: module docstring)."""
    from .generic import GENERIC
    from .opacus import OPACUS, grad_samplers

    kind = type(module)
    if kind in RULES:
        return RULES[kind]
    if kind in grad_samplers() and kind not in OPERATION_RULES:
        return OPACUS
    for base in kind.__mro__[1:]:
        if base in RULES and kind.forward is base.forward:
            return RULES[base]
    return GENERIC


def where(param_name: str, module_name: str, module: nn.Module) -> str:
    """How errors name a parameter: ``parameter 'x.w' of module 'x' (Kind)``."""
    return (
        f"parameter {param_name!r} of module {module_name or '<model>'!r} ({type(module).__name__})"
    )


def _updates_buffers_in_training(module: nn.Module) -> bool:
    norm = nn.modules.batchnorm
    if not (isinstance(module, norm._NormBase) and module.training):
        return False
    return module.track_running_stats or isinstance(module, norm._BatchNorm)


def check_supported(
    module: nn.Module,
    module_name: str,
    param: nn.Parameter,
    param_name: str,
    *,
    strict: bool,
    exact: bool,
    rule: ModuleRule | None = None,
) -> ModuleRule:
    """The rule for ``param`` of ``module``; raise ``NotImplementedError`` naming both if none can.

    Strict mode also refuses batch/instance norms in training mode (their forward updates their
    running-stat buffers, and batch norm couples the examples of a batch); a forward that changes
    any other buffer is refused when featurisation sees it happen.
    """
    rule = rule if rule is not None else rule_for(module)
    if strict and _updates_buffers_in_training(module):
        raise NotImplementedError(
            f"{where(param_name, module_name, module)}: in training mode the module's forward "
            "updates its buffers (running statistics) and couples the examples of a batch, so its "
            "per-example gradients are not defined in strict mode; call model.eval() first (or "
            "pass strict=False to ignore the buffers)"
        )
    reason = rule.check(module, param, exact=exact)
    if reason is not None:
        raise NotImplementedError(f"{where(param_name, module_name, module)}: {reason}")
    return rule
