"""One sketch call per backend over a table of shapes (pytest-benchmark; ``make bench``).

Backends: ``torch`` on the CPU, and ``triton`` on CUDA tensors when CUDA is available. For a
Linear weight on the CPU both exact paths are timed -- ``fft`` (the backend's
``tensor_sketch_linear``) and ``explicit`` (``linear_weight_grads`` + ``sketch_dense``, tables'
index cached as :class:`sdi.rules.SketchRules` caches it) -- and ``extra_info["model_picks"]`` says
which one the cost model in :mod:`sdi.rules` would choose, so its choice can be checked here.
"""

from __future__ import annotations

import cases  # bench/cases.py: bench/conftest.py puts bench/ on sys.path
import pytest
import torch
import torch.nn as nn

from sdi.backend import get_backend
from sdi.rules import SketchRules
from sdi.sketch import draw_count_sketch, draw_tensor_sketch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _per_device(table) -> list:
    """``(device, shape)`` for every case of the shared table (bench/cases.py) on each device here:
    the CPU cases, and on a CUDA machine the GPU ones too."""
    return [
        pytest.param(dev, shape, id=f"{dev}-{shape}")
        for dev in DEVICES
        for shape in cases.on(table, dev)
    ]


def _backend(device: str):
    return get_backend("torch" if device == "cpu" else "triton")


def _run(benchmark, fn, device: str):
    """Benchmark ``fn``, synchronising CUDA so that a call's time includes its kernels."""
    if device == "cuda":
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


def _linear_id(shape):
    return "B{}-T{}-din{}-dout{}-m{}".format(*shape)


@pytest.mark.parametrize("path", ["fft", "explicit"])
@pytest.mark.parametrize("device, shape", _per_device(cases.LINEAR))
def test_tensor_sketch_linear(benchmark, device, path, shape):
    B, T, d_in, d_out, m = shape
    if path == "explicit" and device != "cpu":
        pytest.skip("the materialised-gradient path is a CPU path")
    gen = torch.Generator().manual_seed(0)
    table = draw_tensor_sketch(d_out, d_in, m, gen).to(device)
    a = torch.randn(B, T, d_in, generator=gen).to(device)
    g = torch.randn(B, T, d_out, generator=gen).to(device)
    backend = _backend(device)
    weight = nn.Parameter(torch.empty(d_out, d_in, device=device))
    rules = SketchRules([weight], m, seed=0, backend=backend)
    rules.tables[weight] = table
    benchmark.group = f"tensor_sketch_linear {_linear_id(shape)}"
    benchmark.extra_info.update(
        op="tensor_sketch_linear",
        shape=_linear_id(shape),
        backend=backend.name,
        path=path,
        model_picks="explicit" if rules.prefers_explicit(weight, T, a.device, B) else "fft",
    )
    if path == "fft":
        _run(benchmark, lambda: backend.tensor_sketch_linear(a, g, table), device)
    else:
        _run(
            benchmark, lambda: rules.sketch_dense(weight, rules.weight_grads(weight, a, g)), device
        )


@pytest.mark.parametrize("device, shape", _per_device(cases.COUNT))
def test_count_sketch(benchmark, device, shape):
    rows, d, m = shape
    gen = torch.Generator().manual_seed(1)
    table = draw_count_sketch(d, m, gen).to(device)
    x = torch.randn(rows, d, generator=gen).to(device)
    backend = _backend(device)
    benchmark.group = "count_sketch"
    benchmark.extra_info.update(
        op="count_sketch", shape="rows{}-d{}-m{}".format(*shape), backend=backend.name, path="-"
    )
    _run(benchmark, lambda: backend.count_sketch(x, table), device)


@pytest.mark.parametrize("device, shape", _per_device(cases.EMBEDDING))
def test_tensor_sketch_embedding(benchmark, device, shape):
    B, T, vocab, d, m = shape
    gen = torch.Generator().manual_seed(2)
    table = draw_tensor_sketch(vocab, d, m, gen).to(device)
    ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    g = torch.randn(B, T, d, generator=gen).to(device)
    backend = _backend(device)
    benchmark.group = "tensor_sketch_embedding"
    benchmark.extra_info.update(
        op="tensor_sketch_embedding",
        shape="B{}-T{}-V{}-d{}-m{}".format(*shape),
        backend=backend.name,
        path="shift",
    )
    _run(benchmark, lambda: backend.tensor_sketch_embedding(ids, g, table), device)
