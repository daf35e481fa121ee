"""End to end against a plain training step, as ratios from paired runs (pytest-benchmark).

The DESIGN §5 CPU workload (``bench/speed/workload.py``): ``influence_across_checkpoints`` in
``mode="tracin"`` and ``mode="sdi"``, and, as the yardstick, a plain forward + backward with
parameter gradients (``loss.sum().backward()``) over the same 160 examples. Also timed against that
yardstick: the same forward + backward with every parameter frozen and no sketch math
(``workload.activation_only_step``), the floor of any featurisation of this model. Every benchmark
round is paired with a train step run just before it (the ``setup`` of the round), so both see the
same machine load; ``extra_info`` keeps the per-pair ratios and their median.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import workload

from sdi import ProjectedTracInSDI

ROUNDS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, ckpt, train, query = workload.setup(Path(tmp_path_factory.mktemp("workload")))
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=workload.M)
    yield model, ckpt, train, query, est
    est.close()


def test_train_step(benchmark, setup):
    model, _, train, query, _ = setup
    benchmark.group = "end to end"
    benchmark.extra_info.update(what="train step (forward + backward with parameter grads)")
    benchmark.pedantic(
        lambda: workload.train_step(model, (query, train)), rounds=ROUNDS, warmup_rounds=1
    )


def paired_with_train_step(benchmark, model, loaders, run, what: str) -> None:
    """Benchmark ``run`` in rounds, each after a timed train step; record the per-round ratios."""
    train_step_s: list[float] = []

    def train_step():  # the round's partner, timed here; pytest-benchmark times `run`
        start = time.perf_counter()
        workload.train_step(model, loaders)
        train_step_s.append(time.perf_counter() - start)

    run()  # warm-up
    benchmark.group = "end to end"
    benchmark.pedantic(run, setup=train_step, rounds=ROUNDS)
    ratios = [s / t for s, t in zip(benchmark.stats.stats.data, train_step_s, strict=True)]
    benchmark.extra_info.update(
        what=what, train_step_s=train_step_s, ratios=ratios, ratio_median=statistics.median(ratios)
    )


@pytest.mark.parametrize("mode", ["tracin", "sdi"])
def test_influence_vs_train_step(benchmark, setup, mode):
    model, ckpt, train, query, est = setup
    paired_with_train_step(
        benchmark,
        model,
        (query, train),
        lambda: workload.influence(est, ckpt, train, query, mode),
        f"influence_across_checkpoints(mode={mode!r})",
    )


def test_activation_only_vs_train_step(benchmark, setup):
    model, _, train, query, _ = setup
    paired_with_train_step(
        benchmark,
        model,
        (query, train),
        lambda: workload.activation_only_step(model, (query, train)),
        "floor: forward + activation-only backward, parameters frozen, no sketches",
    )
