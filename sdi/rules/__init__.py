"""Rules: the per-example gradient of one use, and its sketch.

Every use is an :class:`sdi.capture.OpUse` -- an operation captured during the forward, or a
call of a module served by a module-level rule -- and :class:`sdi.rules.ops.OpRules` dispatches it:

==========================  =====================================================================
use                         exact gradient / projected sketch
==========================  =====================================================================
``F.linear``, ``@``,        weight ``G^T A`` / TensorSketch (FFT or, on CPU when cheaper, the
linear ``einsum``           materialised gradient), whatever the module's class (``nn.Linear``,
                            ``CastedLinear``, a bank's slice); bias ``sum_tokens g`` / CountSketch
``einsum``, ``@``, ``bmm``  one ``einsum(x, g -> b w)``: every group's ``G^T A`` / sketch of it
with a 3+-D parameter       (per-head weights, grouped products)
``F.embedding``             ``sum_tokens onehot(id) (x) g`` / TensorSketch by signed shift
broadcast ``x * s``, ``+``  ``g x`` / ``g`` summed over the broadcast dims (per-block vectors)
any other operation         vjp of that one operation per example / sketch of the flattened gradient
a call of a module with a   the module's :class:`ModuleRule`, found by :func:`rule_for` (see
module-level rule           :func:`sdi.selection._module_rule`): Opacus' grad samplers for the
                            types they cover (norms, convolutions; ``register_grad_sampler`` adds
                            types), rules registered with :func:`register_rule`, and the generic
                            rule (the vjp of the module's re-run forward) for a module whose
                            forward hides the batch from the capture
==========================  =====================================================================

A module-level rule owns its exact gradient (:meth:`ModuleRule.grads`), its sketch
(:meth:`ModuleRule.sketch`), its hash table (:meth:`ModuleRule.draw_table`) and how one pass's uses
are summed (:meth:`ModuleRule.add_step`). The Linear path chooses between its two sketch paths by a
CPU cost model (:func:`sdi.rules.linear.explicit_is_cheaper`). Tables are drawn in model order from
one seeded generator, so one seed gives one sketch on every backend.

Registering a rule for your own module type
-------------------------------------------
Capture at the operation already covers any module; register a rule when you know a cheaper
gradient for a whole module's call::

    import sdi

    class Scale(nn.Module):          # y = x * w, w of shape (d,)
        ...

    @sdi.register_rule(Scale)
    class ScaleRule(sdi.ModuleRule):
        def grads(self, module, params, use):
            # use.activations[0]: (B, ..., d) input, use.grad: (B, ..., d) grad of the output
            x, g = use.activations[0], use.grad
            return [(x * g).reshape(use.batch, -1, x.shape[-1]).sum(1).float()]

``grads`` returns one ``(B, param.numel())`` fp32 tensor per parameter in ``params``; the default
``sketch`` then CountSketches it. A rule registered for a type also serves its subclasses that do
not override ``forward``; it is looked up when an estimator is built.
"""

from ..freezing import requires_grad_set
from .generic import GENERIC, GENERIC_CHUNK_BYTES, GenericRule
from .linear import EXPLICIT_MAX_BUFFER_BYTES, explicit_is_cheaper
from .modes import ExactRules, SketchRules, StepSums
from .opacus import OPACUS, OpacusRule
from .registry import (
    RULES,
    ModuleRule,
    Use,
    check_supported,
    register_rule,
    rule_for,
)

__all__ = [
    "EXPLICIT_MAX_BUFFER_BYTES",
    "GENERIC",
    "GENERIC_CHUNK_BYTES",
    "OPACUS",
    "RULES",
    "ExactRules",
    "GenericRule",
    "ModuleRule",
    "OpacusRule",
    "SketchRules",
    "StepSums",
    "Use",
    "check_supported",
    "explicit_is_cheaper",
    "register_rule",
    "requires_grad_set",
    "rule_for",
]
