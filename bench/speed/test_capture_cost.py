"""The cost of capturing uses at the operation (issue 18), as ratios from paired rounds.

Two looped GPTs of ``tests/capture_models.py`` (``LoopedGPT``: one block looped ``TAU`` times,
selected whole; projected ``mode="tracin"`` through ``influence_across_checkpoints``, one
checkpoint, torch backend on the CPU):

- *CastedLinear vs nn.Linear*: the block built from ``CastedLinear`` (``F.linear(x,
  self.weight.to(x.dtype), b)``, as speed-run GPTs) against the same block, same weights, built
  from ``nn.Linear``; no per-block vectors, so the two differ only in the Linear class. Target: at
  most 1.1x.
- *per-block vectors vs a training step*: the block with ``attn_scale``, ``mlp_scale``,
  ``resid_mix`` and per-head ``q_gain`` (built from ``CastedLinear``, and from ``nn.Linear``)
  against a plain forward + backward with parameter gradients over the same batches. Target: at
  most 1.3x.

Every round of a benchmark runs just after a timed round of its partner (pytest-benchmark's
``setup``), so both see the same machine load; ``extra_info`` keeps the per-pair ratios and their
median, and the ratio of the fastest rounds (less sensitive to a loaded machine), which
``bench/speed/report.py`` tables.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from capture_models import LoopedGPT, lm_loss, token_batches

from sdi import CheckpointSpec, ProjectedTracInSDI

VOCAB, D, HEADS, FF, TAU, SEQ = 256, 128, 4, 512, 4, 64
BATCH, N_TRAIN, N_QUERY, M = 16, 48, 16, 1024
ROUNDS = 15  # pairs per row: the median of 15 moves less with the machine load than of 9
GROUP = "capture cost"


def _gpt(casted: bool, vectors: bool) -> LoopedGPT:
    torch.manual_seed(0)  # the same weights whichever Linear class
    size = dict(vocab=VOCAB, d=D, heads=HEADS, ff=FF, tau=TAU)
    return LoopedGPT(casted=casted, vectors=vectors, **size).eval()


class Workload:
    """A model, its checkpoint, the loaders and a projected estimator of its looped block."""

    def __init__(self, model: LoopedGPT, folder):
        self.model = model
        self.path = str(folder / f"{id(model)}.pt")
        torch.save({"model_state_dict": model.state_dict()}, self.path)
        self.train = token_batches(N_TRAIN, BATCH, seed=1, seq=SEQ, vocab=VOCAB)
        self.query = token_batches(N_QUERY, BATCH, seed=2, seq=SEQ, vocab=VOCAB)
        self.est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=M)

    def featurise(self):
        return self.est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(self.path, weight=1.0)],
            train_loader=self.train,
            query_loader=self.query,
            loss_fn=lm_loss,
            mode="tracin",
        )

    def train_step(self) -> None:
        """Forward + backward with parameter gradients over the same batches."""
        for batch in (*self.query, *self.train):
            self.model.zero_grad(set_to_none=True)
            lm_loss(self.model, batch).sum().backward()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("capture")


def paired(benchmark, run, partner, *, what: str, partner_what: str, target: float) -> None:
    """Benchmark ``run`` in rounds, each after a timed ``partner`` round; record the ratios."""
    partner_s: list[float] = []

    def timed_partner():
        start = time.perf_counter()
        partner()
        partner_s.append(time.perf_counter() - start)

    run(), partner()  # warm-up
    benchmark.group = GROUP
    benchmark.pedantic(run, setup=timed_partner, rounds=ROUNDS)
    ratios = [s / p for s, p in zip(benchmark.stats.stats.data, partner_s, strict=True)]
    benchmark.extra_info.update(
        op="capture",
        what=what,
        partner=partner_what,
        partner_s=partner_s,
        ratios=ratios,
        ratio_median=statistics.median(ratios),
        ratio_of_fastest=min(benchmark.stats.stats.data) / min(partner_s),  # steadier under load
        target=target,
    )


def test_casted_linear_vs_linear(benchmark, folder):
    casted = Workload(_gpt(casted=True, vectors=False), folder)
    linear = Workload(_gpt(casted=False, vectors=False), folder)
    try:
        paired(
            benchmark,
            casted.featurise,
            linear.featurise,
            what='GPT from CastedLinear, mode="tracin"',
            partner_what='the same GPT from nn.Linear, mode="tracin"',
            target=1.1,
        )
    finally:
        casted.est.close()
        linear.est.close()


@pytest.mark.parametrize("linear", ["casted", "nn.Linear"])
def test_vectors_vs_train_step(benchmark, folder, linear):
    work = Workload(_gpt(casted=linear == "casted", vectors=True), folder)
    try:
        paired(
            benchmark,
            work.featurise,
            work.train_step,
            what=f'GPT ({linear}) with per-block vectors, mode="tracin"',
            partner_what="a training step (forward + backward with parameter grads)",
            target=1.3,
        )
    finally:
        work.est.close()
