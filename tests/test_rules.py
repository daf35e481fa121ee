"""Per-layer rules (sdi.rules): supported parameters, the Linear paths and their cost model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import explicit_linear_sketch, linear_inputs

from sdi import ProjectedTracInSDI
from sdi.backend import get_backend
from sdi.rules import SketchRules


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


class _Matrix(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.eye(d))

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize(
    "module,culprit",
    [
        (nn.BatchNorm1d(4), "buffers"),
        (_Scale(4), "no per-example gradient rule"),
        (_Matrix(4), "2-D parameter"),
        (nn.Conv1d(4, 4, 1), "3-D parameter"),
    ],
)
def test_unsupported_parameters_are_named(module, culprit):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(NotImplementedError, match=culprit) as err:
        ProjectedTracInSDI(model=model, target_modules=model, projection_size=8)
    assert "'1" in str(err.value) and type(module).__name__ in str(err.value)  # names module "1"


def _rules(module: nn.Linear, m: int, explicit: bool) -> SketchRules:
    rules = SketchRules(list(module.parameters()), m, seed=5, backend=get_backend("torch"))
    rules.prefers_explicit = lambda *args: explicit  # force one path
    return rules


def test_rules_paths_and_step_sums_agree():
    """Per-use features of both paths, and the step sums (which hash once per pass), agree."""
    layer = nn.Linear(21, 35)
    m, B = 50, 3
    uses = [linear_inputs(35, 21, B, T, seed=T) for T in (7, 7, 2)]
    rules = {path: _rules(layer, m, path) for path in (True, False)}
    params = [layer.weight, layer.bias]
    per_use = {
        path: [r.features(layer, params, [a], g) for a, g in uses] for path, r in rules.items()
    }
    for fft, explicit in zip(per_use[False], per_use[True], strict=True):
        for x, y in zip(fft, explicit, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    table = rules[True].tables[layer.weight]
    want_weight = sum(explicit_linear_sketch(a, g, table) for a, g in uses)
    for path, r in rules.items():
        for _ in range(2):  # the reused gradient buffers start from zero on every pass
            sums = r.step_sums()
            for a, g in uses:
                sums.add(layer, params, [a], g)
            got = dict(sums.sketches())
            torch.testing.assert_close(got[layer.weight], want_weight, rtol=1e-4, atol=1e-4)
            want_bias = sum(f[1] for f in per_use[path])
            torch.testing.assert_close(got[layer.bias], want_bias, rtol=1e-4, atol=1e-4)
    # A different batch size gets a fresh buffer.
    a, g = linear_inputs(35, 21, B + 2, 7, seed=9)
    torch.testing.assert_close(
        rules[True].features(layer, params, [a], g)[0],
        explicit_linear_sketch(a, g, table),
        rtol=1e-4,
        atol=1e-4,
    )


def test_cost_model_picks_the_materialised_path_for_small_layers_only():
    small, large = nn.Linear(128, 384, bias=False), nn.Linear(4096, 4096, bias=False)
    rules = SketchRules([small.weight, large.weight], 1024, seed=0, backend=get_backend("torch"))
    cpu = torch.device("cpu")
    assert rules.prefers_explicit(small.weight, 64, cpu)
    assert not rules.prefers_explicit(large.weight, 2048, cpu)
    assert not rules.prefers_explicit(
        small.weight, 64, torch.device("meta")
    )  # not a CPU: backend kernels


def test_cost_model_keeps_the_gradient_buffer_within_its_cap(monkeypatch):
    layer = nn.Linear(128, 384, bias=False)
    rules = SketchRules([layer.weight], 1024, seed=0, backend=get_backend("torch"))
    cpu = torch.device("cpu")
    buffer_bytes = 32 * 384 * 128 * 4
    monkeypatch.setattr("sdi.rules.EXPLICIT_MAX_BUFFER_BYTES", buffer_bytes)
    assert rules.prefers_explicit(layer.weight, 64, cpu, batch=32)
    assert not rules.prefers_explicit(layer.weight, 64, cpu, batch=33)
    # Through the rules, a batch past the cap takes the FFT path: same sketch, no buffer.
    a, g = linear_inputs(384, 128, 33, 64, seed=4)
    table = rules.tables[layer.weight]
    got = rules.features(layer, [layer.weight], [a], g)[0]
    assert layer.weight not in rules._grad_buffers
    torch.testing.assert_close(got, explicit_linear_sketch(a, g, table), rtol=1e-4, atol=1e-4)
