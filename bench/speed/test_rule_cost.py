"""The generic rule's cost relative to the specific ones (pytest-benchmark; ``make bench``).

The same module and the same use -- activations, grad-output, ``B`` examples of ``T`` tokens -- is
featurised (projected, ``m`` buckets, torch backend, CPU) once by its specific rule and once by the
generic rule forced on it (per-example vjp of the re-run forward + CountSketch of the flattened
gradient). The two cases of one module share a pytest-benchmark group, so the table prints them
side by side with their ratio; ``extra_info["rule"]`` names the rule. The generic rule's strict-mode
recompute check (once per module and batch in the featuriser) is not included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from capture_models import CastedLinear

from sdi.backend import get_backend
from sdi.hooks import Call
from sdi.rules import GENERIC, SketchRules, rule_for

B, T, M = 32, 64, 1024  # the DESIGN §5 CPU workload's batch, sequence and sketch size
MODULES = {
    "linear-128x384": (lambda: nn.Linear(128, 384), (B, T, 128)),
    # a Linear subclass with its own (casting) forward; "specific" is whatever rule sdi picks
    "casted-linear-128x384": (lambda: CastedLinear(128, 384), (B, T, 128)),
    "layernorm-128": (lambda: nn.LayerNorm(128), (B, T, 128)),
    "conv1d-128-k3": (lambda: nn.Conv1d(128, 128, 3, padding=1, groups=128), (B, 128, T)),
}


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
    chosen = GENERIC if rule == "generic" else rule_for(module)
    rules = SketchRules(
        params,
        M,
        seed=0,
        backend=get_backend("torch"),
        owners=[module] * len(params),
        rules={module: chosen},
    )
    call = Call((x,), {})
    for p in params:
        p.requires_grad_(False)  # as during featurisation
    benchmark.group = f"rule cost {kind} B{B}-T{T}-m{M}"
    benchmark.extra_info.update(op="rule", shape=kind, rule=type(chosen).__name__, path=rule)
    benchmark.pedantic(
        lambda: rules.features(module, params, [x], g, call), rounds=7, warmup_rounds=1
    )
