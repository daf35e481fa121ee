"""The generic rule's cost relative to the path featurisation takes (pytest-benchmark; ``make bench``).

The same module and the same use -- activations, grad-output, ``B`` examples of ``T`` tokens -- is
featurised (projected, ``m`` buckets, torch backend, CPU) once by the path featurisation takes for
it and once by the generic rule forced on it (per-example vjp of the re-run forward + CountSketch
of the flattened gradient). The path featurisation takes is the module's module-level rule where it
has one (Opacus' samplers for LayerNorm and Conv1d) and otherwise its operations captured during a
forward (``F.linear`` for ``nn.Linear`` and for ``CastedLinear``, a Linear subclass with a casting
forward: the Linear operation rule). The two cases of one module share a pytest-benchmark group, so
the table prints them side by side with their ratio; ``extra_info["rule"]`` names the path. The
generic rule's strict-mode recompute check (once per module and batch in the featuriser) is not
included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from capture_models import CastedLinear
from direct_uses import captured_uses, module_use

from sdi.backend import get_backend
from sdi.rules import GENERIC, SketchRules, rule_for
from sdi.rules.ops import OpRules

B, T, M = 32, 64, 1024  # the DESIGN §5 CPU workload's batch, sequence and sketch size
MODULES = {
    "linear-128x384": (lambda: nn.Linear(128, 384), (B, T, 128)),
    # a Linear subclass with its own (casting) forward
    "casted-linear-128x384": (lambda: CastedLinear(128, 384), (B, T, 128)),
    "layernorm-128": (lambda: nn.LayerNorm(128), (B, T, 128)),
    "conv1d-128-k3": (lambda: nn.Conv1d(128, 128, 3, padding=1, groups=128), (B, 128, T)),
}


def _uses(module: nn.Module, x: torch.Tensor, path: str):
    """``(uses, rules by module, which)``: the generic rule's one use of the call, the module's
    own rule's, or the operations the capture records."""
    params = list(module.parameters())
    if path == "generic":
        return [module_use(module, params, x)], {module: GENERIC}, "GenericRule"
    rule = rule_for(module)
    if rule is not GENERIC:  # a module-level rule (Opacus')
        return [module_use(module, params, x)], {module: rule}, type(rule).__name__
    uses = captured_uses(module, x)
    return uses, {}, "+".join(u.name for u in uses)


@pytest.mark.parametrize("rule", ["specific", "generic"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_rule_cost(benchmark, kind, rule):
    make, shape = MODULES[kind]
    torch.manual_seed(0)
    module = make()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        g = torch.randn(module(x).shape, generator=gen)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(False)  # as during featurisation
    uses, by_module, name = _uses(module, x, rule)
    rules = SketchRules(params, M, seed=0, backend=get_backend("torch"), rules=by_module)
    dispatch = OpRules(lambda: rules)
    benchmark.group = f"rule cost {kind} B{B}-T{T}-m{M}"
    benchmark.extra_info.update(op="rule", shape=kind, rule=name, path=rule)
    benchmark.pedantic(
        lambda: [dispatch.features(use, g) for use in uses], rounds=7, warmup_rounds=1
    )
