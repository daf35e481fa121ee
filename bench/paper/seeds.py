"""Projected features of several sketch seeds from one forward and backward.

The public estimator draws one seed's tables; ten seeds would cost ten forward and backward passes
of the 135M model, which is most of the paper bench's time budget. The sketch of every use is
computed from that use's activations and grad-output alone, so here one backward feeds every
seed's rules: the rules of ``ProjectedTracInSDI(seed=s)`` (the same tables, drawn by the estimator
itself) are stacked, each parameter's columns holding one block of ``m`` per seed. This uses the
featuriser's ``op_rules`` attribute (every use goes through it); the bench checks seed 0 against the
public call (per-step features bitwise, the train side to float rounding: the public call sums
some gradients before hashing them, here every use is hashed and the sketches summed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdi import ProjectedTracInSDI
from sdi.rules.ops import OpRules


class SeedStack:
    """The operation rules of several seeds side by side: ``features`` gives ``(B, seeds * m)``
    per param (the featuriser's ``op_rules``, :class:`sdi.rules.ops.OpRules`)."""

    def __init__(self, per_seed: Sequence):
        self.per_seed = [OpRules(lambda rules=rules: rules) for rules in per_seed]

    def features(self, use, g, sums=None) -> dict:
        each = [rules.features(use, g) for rules in self.per_seed]
        return {p: torch.cat([e[p] for e in each], dim=-1) for p in each[0]}


def per_seed_features(
    model, target_modules, batch, loss_fn, m: int, seeds: Sequence[int]
) -> tuple[torch.Tensor, list]:
    """``(features (seeds, B, steps, D), blocks)``: per-step projected features of ``batch`` for
    every seed, ``D`` = selected parameters x ``m`` in the estimator's column order."""
    per_seed = []
    for seed in seeds:  # each estimator draws its tables; only its rules are kept
        est = ProjectedTracInSDI(
            model=model, target_modules=target_modules, projection_size=m, seed=seed
        )
        per_seed.append(est._featurizer.rules)
        blocks = est._featurizer.blocks
        est.close()
    stacked = ProjectedTracInSDI(
        model=model, target_modules=target_modules, projection_size=len(seeds) * m, seed=0
    )
    featurizer = stacked._featurizer
    featurizer.op_rules = SeedStack(per_seed)
    try:
        feats, _ = featurizer.compute_batch(batch, loss_fn)  # (B, steps, params * seeds * m)
    finally:
        stacked.close()
    B, steps, _ = feats.shape
    # Column order: parameter, then seed, then bucket -> (seeds, B, steps, params * m).
    feats = feats.view(B, steps, len(blocks), len(seeds), m).permute(3, 0, 1, 2, 4)
    return feats.reshape(len(seeds), B, steps, len(blocks) * m), blocks
