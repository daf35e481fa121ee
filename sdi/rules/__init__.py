"""Rules: the per-example gradient of one use, and its sketch.

Uses are captured at the operation (:mod:`sdi.capture`) and served by the rules of
:mod:`sdi.rules.ops` -- ``F.linear`` / ``matmul`` as ``G^T A`` whatever the module's class,
``F.embedding`` by a signed shift, broadcast products by a sum, anything else by the vjp of that
one operation. A module's own calls are served by a module-level :class:`ModuleRule` instead where
one applies, found by :func:`rule_for` in a registry (see :func:`sdi.selection._module_rule`):

==========================  =====================================================================
module kind                 exact gradient / projected sketch
==========================  =====================================================================
``nn.Linear``               weight ``G^T A`` / TensorSketch (FFT or, on CPU when cheaper, the
                            materialised gradient); bias ``sum_tokens g`` / CountSketch
``nn.Embedding``            ``sum_tokens onehot(id) (x) g`` / TensorSketch by signed shift
Opacus-covered types        Opacus' grad sampler / CountSketch of the flattened gradient
(``GRAD_SAMPLERS``)         (norms, convolutions; ``register_grad_sampler`` adds types)
generic (registered for a  vjp of the module's re-run forward, vmapped over the batch or looped
type; or a module whose     per example (:mod:`sdi.rules.generic`) / sketch of the flattened
forward hides the batch)    gradient
==========================  =====================================================================

Each rule owns its exact gradient (:meth:`ModuleRule.grads`), its sketch (:meth:`ModuleRule.sketch`),
its hash table (:meth:`ModuleRule.draw_table`), how one pass's uses are summed
(:meth:`ModuleRule.add_step`) and, where it has more than one path, the CPU cost model that
chooses between them (:func:`sdi.rules.linear.explicit_is_cheaper`). Tables are drawn in model
order from one seeded generator, so one seed gives one sketch on every backend.

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

import torch.nn as nn

from ..freezing import requires_grad_set
from .embedding import EmbeddingRule
from .generic import GENERIC, GENERIC_CHUNK_BYTES, GenericRule
from .linear import EXPLICIT_MAX_BUFFER_BYTES, LinearRule, explicit_is_cheaper
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

register_rule(nn.Linear, LinearRule)
register_rule(nn.Embedding, EmbeddingRule)

__all__ = [
    "EXPLICIT_MAX_BUFFER_BYTES",
    "GENERIC",
    "GENERIC_CHUNK_BYTES",
    "OPACUS",
    "RULES",
    "EmbeddingRule",
    "ExactRules",
    "GenericRule",
    "LinearRule",
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
