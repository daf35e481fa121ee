"""Modules Opacus has a grad sampler for (norms, convolutions, ...; see ``GRAD_SAMPLERS``).

Their per-example gradients come from Opacus' sampler of the module's type, and are sketched as a
CountSketch of the flattened gradient. ``opacus.grad_sample.register_grad_sampler`` adds a type here.
"""

from __future__ import annotations

import torch

from ..freezing import requires_grad_set
from .registry import ModuleRule, Use


def grad_samplers() -> dict:
    """Opacus' registry of grad samplers by module type (imported on first use: importing Opacus
    takes longer than importing the rest of sdi)."""
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS


class OpacusRule(ModuleRule):
    def check(self, module, param, *, exact: bool) -> str | None:
        if type(module) not in grad_samplers():
            return "Opacus has no grad sampler for this module type"
        return None

    def grads(self, module, params, use: Use) -> list[torch.Tensor]:
        sampler = grad_samplers()[type(module)]
        # Opacus' samplers skip parameters that do not require grad; featurisation froze them all.
        with requires_grad_set(params, True):
            grads = sampler(module, use.activations, use.grad)
        if any(p not in grads for p in params):
            raise RuntimeError(
                f"Opacus' grad sampler for {type(module).__name__} returned no grad for a "
                "selected parameter"
            )
        return [grads[p].reshape(use.batch, -1).float() for p in params]


OPACUS = OpacusRule()
