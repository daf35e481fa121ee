"""The rule registry and the generic rule (issue 11, points 1 and 2).

The generic rule's per-example gradients are checked against plain autograd on a per-example loop
(``torch.autograd.grad`` of each example's output, one example at a time) for modules of every
shape it must cover, and against the specific rules where both apply (nn.Linear, nn.LayerNorm,
nn.Conv1d), with fresh random inputs and odd sizes.
"""

from __future__ import annotations

import dataclasses

import looped_lm
import pytest
import torch
import torch.nn as nn
from conftest import explicit_linear_sketch, linear_inputs, tiny_model
from direct_uses import features, linear_use, module_use, rule_view
from opacus.grad_sample.grad_sample_module import GradSampleModule

import sdi
from sdi import ProjectedTracInSDI
from sdi.backend import TORCH, get_backend
from sdi.featurize import Featurizer
from sdi.kernels import torch_ops
from sdi.rules import (
    GENERIC,
    OPACUS,
    RULES,
    ExactRules,
    GenericRule,
    ModuleRule,
    SketchRules,
    register_rule,
    rule_for,
)
from sdi.toy import next_token_loss, random_token_batches


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from looped_lm.one_thread()


class Scale(nn.Module):  # 1-D parameter
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


class Matrix(nn.Module):  # 2-D, not a Linear; a keyword-only tensor argument
    def __init__(self, d, e):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, e))

    def forward(self, x, *, gain=None):
        y = x @ self.w
        return y if gain is None else y * gain


class TopKExperts(nn.Module):
    """Router ``(E, d)`` and a 3-D expert bank; top-k routing with ``nonzero`` (vmap cannot follow)."""

    def __init__(self, d, f, experts, k):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, d))
        self.up = nn.Parameter(torch.randn(experts, d, f) / d**0.5)
        self.down = nn.Parameter(torch.randn(experts, f, d) / f**0.5)
        self.k = k

    def forward(self, x):  # (B, T, d)
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = (flat @ self.router.t()).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.router.shape[0]):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                h = torch.relu(flat[rows] @ self.up[e]) @ self.down[e]
                out = out.index_add(0, rows, h * weights[rows, slot, None])
        return out.reshape(x.shape)


class TwoOutputs(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w, (x * self.w).sum(-1)


def _reference(module, params, args_of, g, batch_dim=0):
    """Per-example autograd: ``args_of(i) -> (args, kwargs)`` of example ``i`` (a batch of one)."""
    out = []
    for i in range(g.shape[batch_dim]):
        with torch.enable_grad():
            args, kwargs = args_of(i)
            y = module(*args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            grads = torch.autograd.grad(y, params, g.narrow(batch_dim, i, 1), allow_unused=True)
        out.append(
            [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads, strict=True)]
        )
    return [torch.stack([o[j] for o in out]).reshape(len(out), -1) for j in range(len(params))]


def _use(x, g, kwargs=None, batch_dim=0):
    """A call with input ``x`` (and ``kwargs``), grad-output ``g``, as a module-level rule sees it."""
    return rule_view(None, (), x, g, kwargs, batch_dim)


def _gen(seed=None):
    return torch.Generator().manual_seed(
        int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed
    )


@pytest.mark.parametrize(
    "make,out_dim",
    [
        (lambda: Scale(7), 7),
        (lambda: Matrix(7, 5), 5),
        (lambda: TopKExperts(7, 6, experts=4, k=2), 7),
        (lambda: nn.Conv1d(7, 5, 3, padding=1), None),
    ],
    ids=["1d", "2d", "moe-3d", "conv1d"],
)
def test_generic_equals_per_example_autograd(make, out_dim):
    gen = _gen()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    module = make()
    params = list(module.parameters())
    B, T = 5, 3
    x = (
        torch.randn(B, 7, T, generator=gen)
        if out_dim is None
        else torch.randn(B, T, 7, generator=gen)
    )
    with torch.no_grad():
        y = module(x)
    g = torch.randn(y.shape, generator=gen)
    got = GENERIC.grads(module, params, _use(x, g))
    want = _reference(module, params, lambda i: ((x[i : i + 1],), {}), g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Only the routed module needs the per-example loop; the others stay vmapped.
    assert GENERIC.uses_loop(module) == isinstance(module, TopKExperts)


def test_generic_takes_keyword_arguments_and_a_batch_in_dimension_1():
    gen = _gen()
    module = Matrix(6, 4)
    x = torch.randn(3, 5, 6, generator=gen)  # (T, B, d): batch in dimension 1
    gain = torch.randn(3, 5, 4, generator=gen)
    g = torch.randn(3, 5, 4, generator=gen)
    got = GENERIC.grads(module, [module.w], _use(x, g, {"gain": gain}, batch_dim=1))
    want = _reference(
        module, [module.w], lambda i: ((x[:, i : i + 1],), {"gain": gain[:, i : i + 1]}), g, 1
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_generic_chunks_the_batch_under_its_memory_limit(monkeypatch):
    module = TopKExperts(5, 4, experts=3, k=1)
    params = list(module.parameters())
    x = torch.randn(7, 2, 5)
    g = torch.randn(7, 2, 5)
    whole = GENERIC.grads(module, params, _use(x, g))
    numel = sum(p.numel() for p in params)
    monkeypatch.setattr("sdi.rules.generic.GENERIC_CHUNK_BYTES", 3 * numel * 4)  # 3 examples
    seen = []
    rule = GenericRule()
    vjp = rule._vjp
    monkeypatch.setattr(rule, "_vjp", lambda *args: (seen.append(args[5].shape[0]), vjp(*args))[1])
    chunked = rule.grads(module, params, _use(x, g))
    assert seen == [3, 3, 1]
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("specific", [nn.LayerNorm(6), nn.Conv1d(6, 5, 3, padding=1)])
def test_generic_equals_the_opacus_rule(specific):
    gen = _gen()
    with torch.no_grad():
        for p in specific.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    conv = isinstance(specific, nn.Conv1d)
    x = torch.randn(4, 6, 9, generator=gen) if conv else torch.randn(4, 9, 6, generator=gen)
    with torch.no_grad():
        g = torch.randn(specific(x).shape, generator=gen)
    params = list(specific.parameters())
    rule = rule_for(specific)
    assert rule is OPACUS
    for a, b in zip(
        rule.grads(specific, params, _use(x, g)),
        GENERIC.grads(specific, params, _use(x, g)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_generic_forced_on_a_whole_model_equals_the_specific_rules(monkeypatch):
    """tiny_model's loop core (nn.Linear + nn.LayerNorm): exact features with the generic rule
    forced on both types equal those of the Linear operation rule and the Opacus rule."""
    model = tiny_model(seed=4, steps=3)
    batch = random_token_batches(5, 5, 7, 19, seed=2)[0]

    def features():
        f = Featurizer(model=model, target_modules=model.core, projection_size=None)
        out = f.compute_batch(batch, next_token_loss)
        f.close()
        return out

    want, steps = features()
    monkeypatch.setitem(RULES, nn.Linear, GENERIC)
    monkeypatch.delitem(GradSampleModule.GRAD_SAMPLERS, nn.LayerNorm)
    assert rule_for(model.core.norm) is GENERIC and rule_for(model.core.qkv) is GENERIC
    got, _ = features()
    assert steps == 3 and got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_generic_sketch_is_count_sketch_of_the_exact_gradient():
    module = Matrix(5, 3)
    x, g = torch.randn(4, 2, 5), torch.randn(4, 2, 3)
    rules = SketchRules([module.w], 37, seed=3, backend=get_backend("torch"), owners=[module])
    table = rules.tables[module.w]
    assert table.d == 15  # one CountSketch table of the flattened (5, 3) parameter
    rules.use_rule(module, GENERIC)
    use = module_use(module, [module.w], x)
    got = features(rules, use, g)
    exact = features(ExactRules(rules={module: GENERIC}), use, g)
    torch.testing.assert_close(got[0], torch_ops.count_sketch(exact[0], table))
    sums = rules.step_sums()
    for _ in range(2):
        assert features(rules, use, g, sums) == []
    torch.testing.assert_close(dict(sums.sketches())[module.w], 2 * got[0])


def test_register_rule_for_a_custom_module():
    class Gain(nn.Module):  # defined here: the registration stays local to this test
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return x * self.w

    calls = []

    @register_rule(Gain)
    class GainRule(ModuleRule):
        def grads(self, module, params, use):
            calls.append(use.batch)
            x, g = use.activations[0], use.grad
            return [(x * g).reshape(use.batch, -1, x.shape[-1]).sum(1).float()]

    try:
        module = Gain(6)
        assert isinstance(rule_for(module), GainRule)
        model = nn.Sequential(nn.Linear(4, 6), module, nn.Linear(6, 1))
        x = torch.randn(5, 3, 4)

        def loss_fn(m, batch):
            return m(batch).pow(2).sum(dim=(1, 2))

        def exact():
            f = Featurizer(model=model, target_modules=module, projection_size=None)
            out, _ = f.compute_batch(x, loss_fn)
            f.close()
            return out

        got = exact()
        assert calls == [5]
        RULES.pop(Gain)
        assert rule_for(module) is GENERIC
        torch.testing.assert_close(got, exact(), rtol=1e-5, atol=1e-6)
        assert calls == [5]
    finally:
        RULES.pop(Gain, None)
    assert sdi.register_rule is register_rule and sdi.ModuleRule is ModuleRule


def test_opacus_register_grad_sampler_keeps_working():
    from opacus.grad_sample.utils import register_grad_sampler

    class Shift(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.b = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return x + self.b

    @register_grad_sampler(Shift)
    def _sampler(layer, activations, backprops):
        return {layer.b: backprops.reshape(backprops.shape[0], -1, backprops.shape[-1]).sum(1)}

    try:
        module = Shift(4)
        assert rule_for(module) is OPACUS
        x, g = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
        got = OPACUS.grads(module, [module.b], _use(x, g))
        torch.testing.assert_close(got[0], GENERIC.grads(module, [module.b], _use(x, g))[0])
    finally:
        GradSampleModule.GRAD_SAMPLERS.pop(Shift)


def test_lookup_follows_subclasses_only_when_forward_is_kept():
    class KeepsForward(nn.Linear):
        pass

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Gain(Scale):
        pass

    class OwnGain(Scale):
        def forward(self, x):
            return super().forward(x) * 2

    # Linear and Embedding are served by their operations' rules, not by a module-level rule.
    assert rule_for(nn.Linear(3, 2)) is GENERIC and rule_for(nn.Embedding(3, 2)) is GENERIC
    assert rule_for(KeepsForward(3, 2)) is GENERIC and rule_for(OwnForward(3, 2)) is GENERIC
    rule = GenericRule()
    RULES[Scale] = rule
    try:
        assert rule_for(Gain(3)) is rule and rule_for(OwnGain(3)) is GENERIC
    finally:
        RULES.pop(Scale)
    assert rule_for(nn.LayerNorm(3)) is OPACUS
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_rule(int, GenericRule())
    with pytest.raises(TypeError, match="ModuleRule"):
        register_rule(Scale, object())


def test_backends_declare_the_cpu_fast_paths():
    assert TORCH.runs_cpu_fast_paths
    layer = nn.Linear(128, 384, bias=False)
    cpu = torch.device("cpu")
    rules = SketchRules([layer.weight], 1024, seed=0, backend=TORCH)
    assert rules.prefers_explicit(layer.weight, 64, cpu)
    no_fast = dataclasses.replace(TORCH, name="torch", runs_cpu_fast_paths=False)
    rules = SketchRules([layer.weight], 1024, seed=0, backend=no_fast)
    assert not rules.prefers_explicit(layer.weight, 64, cpu)
    try:
        from sdi.backend import _triton_backend

        assert not _triton_backend().runs_cpu_fast_paths
    except ImportError:  # no Triton here: its flag is checked where it is installed
        pass


class Counter(nn.Module):
    """A forward that changes a buffer (not computable per example), and a constant buffer."""

    def __init__(self, d, mutate):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.register_buffer("mask", torch.ones(d))
        self.register_buffer("calls", torch.zeros(()))
        self.mutate = mutate

    def forward(self, x):
        if self.mutate:
            self.calls += 1
        return x * self.w * self.mask


class BatchCentred(nn.Module):
    """Couples the examples of a batch through a batch mean, with no buffer at all."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.w


def _featurize(module, strict=True, dropout=0.0):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(dropout), module, nn.Linear(4, 1))
    f = Featurizer(model=model, target_modules=module, projection_size=None, strict=strict)
    try:
        return f.compute_batch(torch.randn(3, 2, 4), lambda m, b: m(b).sum(dim=(1, 2)))
    finally:
        f.close()


def test_strict_refuses_only_what_cannot_be_computed():
    feats, steps = _featurize(Counter(4, mutate=False))  # constant buffers are fine
    assert steps == 1 and feats.abs().max() > 0
    mutating = Counter(4, mutate=True)
    with pytest.raises(NotImplementedError, match=r"'2.w'.*Counter.*\['calls'\]"):
        _featurize(mutating)
    _featurize(mutating, strict=False)
    with pytest.raises(RuntimeError, match=r"\['2.w'\] \(BatchCentred\).*couples the examples"):
        _featurize(BatchCentred(4))
    _featurize(BatchCentred(4), strict=False)


def test_random_forward_is_refused_by_the_generic_rule(monkeypatch):
    """Captured at the operation (the default), ``x * w`` is exact whatever dropout does after it;
    the generic module-level rule, which re-runs the forward, must refuse."""

    class Noisy(Scale):
        def forward(self, x):
            return nn.functional.dropout(x * self.w, 0.5, training=True)

    monkeypatch.setitem(RULES, Noisy, GENERIC)
    with pytest.raises(RuntimeError, match="random numbers"):
        _featurize(Noisy(4), strict=False)


def test_a_gradient_through_a_second_output_is_refused_by_module_rules(monkeypatch):
    """A module-level rule differentiates the first output only (captured at the operation, each
    ``x * w`` is a use of its own and nothing needs refusing: tests/test_capture.py)."""
    monkeypatch.setitem(RULES, TwoOutputs, GENERIC)
    module = TwoOutputs(4)

    def loss_fn(m, x):
        y, s = module(x)
        return y.sum(dim=(1, 2)) + s.sum(1)

    f = Featurizer(model=module, target_modules=module, projection_size=None)
    with pytest.raises(RuntimeError, match="output 1 of TwoOutputs"):
        f.compute_batch(torch.randn(3, 2, 4), loss_fn)
    # Unused, the second output is no problem.
    feats, _ = f.compute_batch(torch.randn(3, 2, 4), lambda m, x: m(x)[0].sum(dim=(1, 2)))
    f.close()
    assert feats.shape == (3, 1, 4)


def test_buffers_changed_outside_the_selection_are_not_refused():
    scale = Scale(4)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), scale, nn.Linear(4, 1)).train()
    f = Featurizer(model=model, target_modules=scale, projection_size=None)
    feats, steps = f.compute_batch(torch.randn(3, 4), lambda m, b: m(b).sum(1))
    f.close()
    assert steps == 1 and feats.abs().max() > 0


def test_hash_tables_keep_the_seeded_draw_order():
    """Tables drawn in model order, per parameter ``h`` then ``s``, a matrix's output side first:
    the order 0.1.1 draws in (sdi.sketch), so both packages hash alike for one seed."""
    from sdi.sketch import draw_count_sketch, draw_tensor_sketch

    model = tiny_model(seed=1)
    targets = [model.embed, model.core, model.head]
    f = Featurizer(model=model, target_modules=targets, projection_size=97, seed=5, backend=TORCH)
    f.close()
    gen = torch.Generator().manual_seed(5)
    for module in [model.embed, *model.core.modules(), model.head]:
        for p in module.parameters(recurse=False):
            if p.dim() == 2:
                want = draw_tensor_sketch(p.shape[0], p.shape[1], 97, gen)
                got = f.rules.tables[p]
                pairs = [(got.out, want.out), (got.inp, want.inp)]
            else:
                pairs = [(f.rules.tables[p], draw_count_sketch(p.numel(), 97, gen))]
            for a, b in pairs:
                assert torch.equal(a.h, b.h) and torch.equal(a.s, b.s)


@pytest.mark.parametrize(
    "module,culprit",
    [
        (nn.BatchNorm1d(4), "buffers"),
        (nn.Embedding(4, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
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
    per_use = {
        path: [features(r, linear_use(layer, a), g) for a, g in uses] for path, r in rules.items()
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
                assert features(r, linear_use(layer, a), g, sums) == []
            got = dict(sums.sketches())
            torch.testing.assert_close(got[layer.weight], want_weight, rtol=1e-4, atol=1e-4)
            want_bias = sum(f[1] for f in per_use[path])
            torch.testing.assert_close(got[layer.bias], want_bias, rtol=1e-4, atol=1e-4)
    # A different batch size gets a fresh buffer.
    a, g = linear_inputs(35, 21, B + 2, 7, seed=9)
    torch.testing.assert_close(
        features(rules[True], linear_use(layer, a), g)[0],
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
    monkeypatch.setattr("sdi.rules.linear.EXPLICIT_MAX_BUFFER_BYTES", buffer_bytes)
    assert rules.prefers_explicit(layer.weight, 64, cpu, batch=32)
    assert not rules.prefers_explicit(layer.weight, 64, cpu, batch=33)
    # Through the rules, a batch past the cap takes the FFT path: same sketch, no buffer.
    a, g = linear_inputs(384, 128, 33, 64, seed=4)
    table = rules.tables[layer.weight]
    got = features(rules, linear_use(layer, a), g)[0]
    assert layer.weight not in rules._grad_buffers
    torch.testing.assert_close(got, explicit_linear_sketch(a, g, table), rtol=1e-4, atol=1e-4)
