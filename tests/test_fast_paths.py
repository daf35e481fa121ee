"""The CPU fast paths compute the sketch's exact definition (DESIGN §2, identity 1).

Fresh random inputs with odd sizes: the materialised-gradient path (``linear_weight_grads`` +
``sketch_dense``) and the per-pass step sums of :class:`sdi.rules.SketchRules` must equal
``sketch_matrix_explicit`` of the explicit gradient, and the FFT path, to float tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_model

from sdi.backend import get_backend
from sdi.featurize import Featurizer
from sdi.kernels import torch_ops
from sdi.rules import SketchRules
from sdi.sketch import draw_tensor_sketch, sketch_matrix_explicit
from sdi.toy import next_token_loss, random_token_batches

SHAPES = [(13, 7, 32, 3, 5), (5, 37, 64, 2, 1), (33, 9, 17, 1, 4), (129, 65, 1000, 4, 11)]


def _inputs(d_out, d_in, B, T, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d_in, generator=gen).to(dtype)
    g = torch.randn(B, T, d_out, generator=gen).to(dtype)
    return a, g


def _explicit(a, g, table):
    return sketch_matrix_explicit(torch.einsum("bto,bti->boi", g.float(), a.float()), table)


@pytest.mark.parametrize("d_out,d_in,m,B,T", SHAPES)
def test_materialised_path_equals_definition_and_fft_path(d_out, d_in, m, B, T):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh tables and inputs every run
    table = draw_tensor_sketch(d_out, d_in, m, torch.Generator().manual_seed(seed))
    a, g = _inputs(d_out, d_in, B, T, seed + 1)
    phi = torch_ops.linear_weight_grads(a, g)
    assert phi.shape == (B, d_out, d_in)
    torch.testing.assert_close(phi, torch.einsum("bto,bti->boi", g, a), rtol=1e-5, atol=1e-5)
    got = torch_ops.sketch_dense(phi, torch_ops.signed_index(table), m)
    assert got.dtype == torch.float32 and got.shape == (B, m)
    torch.testing.assert_close(got, _explicit(a, g, table), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        got, torch_ops.tensor_sketch_linear(a, g, table), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("d_out,d_in", [(31, 9), (9, 31)])  # both memory layouts of the result
def test_weight_grads_overwrite_and_add_in_place(d_out, d_in):
    a, g = _inputs(d_out, d_in, 3, 5, seed=d_out)
    a2, g2 = _inputs(d_out, d_in, 3, 5, seed=d_out + 1)
    out = torch_ops.linear_weight_grads(a, g)
    same = torch_ops.linear_weight_grads(a2, g2, out)
    assert same.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch_ops.linear_weight_grads(a2, g2))
    torch_ops.linear_weight_grads(a, g, out, add=True)
    want = torch.einsum("bto,bti->boi", g, a) + torch.einsum("bto,bti->boi", g2, a2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Any layout of phi and index gives the same sketch (only the speed differs).
    table = draw_tensor_sketch(d_out, d_in, 23, torch.Generator().manual_seed(d_in))
    index = torch_ops.signed_index(table)
    for phi in (out, out.contiguous(), out.transpose(1, 2).contiguous().transpose(1, 2)):
        for idx in (index, index.t().contiguous().t()):
            torch.testing.assert_close(
                torch_ops.sketch_dense(phi, idx, 23), sketch_matrix_explicit(out, table)
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_materialised_path_takes_half_inputs(dtype):
    table = draw_tensor_sketch(11, 6, 40, torch.Generator().manual_seed(3))
    a, g = _inputs(11, 6, 2, 4, seed=4, dtype=dtype)
    got = torch_ops.sketch_dense(
        torch_ops.linear_weight_grads(a, g), torch_ops.signed_index(table), 40
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _explicit(a, g, table), rtol=1e-4, atol=1e-4)


def _rules(module: nn.Linear, m: int, explicit: bool) -> SketchRules:
    rules = SketchRules(list(module.parameters()), m, seed=5, backend=get_backend("torch"))
    rules.prefers_explicit = lambda *args: explicit  # force one path
    return rules


def test_rules_paths_and_step_sums_agree():
    """Per-use features of both paths, and the step sums (which hash once per pass), agree."""
    layer = nn.Linear(21, 35)
    m, B = 50, 3
    uses = [_inputs(35, 21, B, T, seed=T) for T in (7, 7, 2)]
    rules = {path: _rules(layer, m, path) for path in (True, False)}
    params = [layer.weight, layer.bias]
    per_use = {
        path: [r.features(layer, params, [a], g) for a, g in uses] for path, r in rules.items()
    }
    for fft, explicit in zip(per_use[False], per_use[True], strict=True):
        for x, y in zip(fft, explicit, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    table = rules[True].tables[layer.weight]
    want_weight = sum(_explicit(a, g, table) for a, g in uses)
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
    a, g = _inputs(35, 21, B + 2, 7, seed=9)
    torch.testing.assert_close(
        rules[True].features(layer, params, [a], g)[0], _explicit(a, g, table), rtol=1e-4, atol=1e-4
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
    monkeypatch.setattr("sdi.rules.linear.EXPLICIT_MAX_BUFFER_BYTES", buffer_bytes)
    assert rules.prefers_explicit(layer.weight, 64, cpu, batch=32)
    assert not rules.prefers_explicit(layer.weight, 64, cpu, batch=33)
    # Through the rules, a batch past the cap takes the FFT path: same sketch, no buffer.
    a, g = _inputs(384, 128, 33, 64, seed=4)
    table = rules.tables[layer.weight]
    got = rules.features(layer, [layer.weight], [a], g)[0]
    assert layer.weight not in rules._grad_buffers
    torch.testing.assert_close(got, _explicit(a, g, table), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("explicit", [True, False])
def test_summed_features_equal_per_step_features_summed(explicit):
    model = tiny_model(seed=2, steps=3)
    batch = random_token_batches(4, 4, 7, 19, seed=3)[0]
    featurizer = Featurizer(
        model=model,
        target_modules=model.core,
        projection_size=61,
        seed=1,
        backend=get_backend("torch"),
    )
    featurizer.rules.prefers_explicit = lambda *args: explicit
    per_step, steps = featurizer.compute_batch(batch, next_token_loss)
    summed, _ = featurizer.compute_batch(batch, next_token_loss, sum_steps=True)
    featurizer.close()
    assert steps == 3 and summed.shape == (4, featurizer.width)
    torch.testing.assert_close(summed, per_step.sum(dim=1), rtol=1e-4, atol=1e-5)
