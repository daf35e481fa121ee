"""Uses built by hand, as the capture records them, for tests that call the rules directly.

The featuriser gets every use from the forward (:mod:`sdi.capture`); a rule's own test builds the
same :class:`sdi.capture.OpUse` from chosen activations and grad-outputs and hands it to the one
dispatcher, :class:`sdi.rules.ops.OpRules`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdi.capture import Batched, CaptureMode, Operand, OpUse, Scope
from sdi.derived import Derived
from sdi.rules import Use
from sdi.rules.ops import OpRules


def _batched(x: torch.Tensor, dim: int) -> Batched:
    return Batched(x.detach(), dim, x._version)


def module_use(module: nn.Module, params, x: torch.Tensor, kwargs=None, batch_dim: int = 0):
    """``module(x, **kwargs)`` as a use of its module-level rule; ``x`` and every tensor keyword
    argument per-example on ``batch_dim``."""
    kwargs = {
        k: _batched(v, batch_dim) if torch.is_tensor(v) else v for k, v in (kwargs or {}).items()
    }
    return OpUse(module, (_batched(x, batch_dim),), kwargs, tuple(params), batch_dim)


def rule_view(module, params, x, g, kwargs=None, batch_dim: int = 0) -> Use:
    """What a module-level rule sees of ``module(x)`` with grad-output ``g`` (batch on ``batch_dim``)."""
    op = module_use(module, params, x, kwargs, batch_dim)
    return Use([x.movedim(batch_dim, 0)], g.movedim(batch_dim, 0), op)


def linear_use(layer: nn.Linear, a: torch.Tensor, params=None) -> OpUse:
    """``F.linear(a, layer.weight, layer.bias)`` with ``a`` ``(B, T, d_in)`` per-example."""
    w, b = layer.weight, layer.bias
    args = [_batched(a, 0), Operand(Derived((w,)), tuple(w.shape))]
    if b is not None:
        args.append(Operand(Derived((b,)), tuple(b.shape)))
    params = tuple(layer.parameters()) if params is None else tuple(params)
    return OpUse(F.linear, tuple(args), {}, params, 0)


def features(rules, use: OpUse, g: torch.Tensor, sums=None) -> list[torch.Tensor]:
    """The features of ``use`` under ``rules`` (:class:`SketchRules` / :class:`ExactRules`), one per
    parameter of the use, in its order (``sums``: added to the step sums instead, ``[]``)."""
    out = OpRules(lambda: rules).features(use, g, sums)
    return [out[p] for p in use.params if p in out]


class _Collect(Scope):
    """Every use of ``params`` in one forward, kept in order."""

    def __init__(self, params):
        self._params = {id(p): p for p in params}
        self.uses: list[OpUse] = []

    def param_of(self, t):
        p = self._params.get(id(t))
        return p if p is t else None

    def counts(self, p, func) -> bool:
        return True

    def record(self, use, out, keys):
        self.uses.append(use)
        return out


def captured_uses(module: nn.Module, x: torch.Tensor, batch_dim: int = 0) -> list[OpUse]:
    """The uses of ``module``'s parameters that the capture records when it runs on ``x``
    (per-example on ``batch_dim``): its operations, whatever its class."""
    scope = _Collect(list(module.parameters()))
    with torch.enable_grad(), CaptureMode(scope) as mode:
        mode.seed(x, batch_dim)
        module(x)
    return scope.uses
