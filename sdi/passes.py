"""The checkpoint loop: per checkpoint, load it, then pair every query chunk with every train batch.

Per checkpoint the query set is featurised once (in chunks of at most ``max_query_bytes``), then the
train set is streamed batch by batch (:class:`sdi.train_stream.TrainStream`) once per query chunk
-- or, when the two loaders are one object, the set is featurised once for both (:mod:`sdi.self_influence`);
the consumer contracts each :class:`Pair` and drops it, so memory beyond the model is the query
features and the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint_into
from .distributed import LocalSharding, Sharding
from .featurize import Featurizer, LossFn
from .fingerprints import checkpoint_fingerprint, loss_fn_fingerprint, model_fingerprint
from .loaders import count_batches, query_chunks, rows_name, warn_if_shuffled
from .options import RunOptions
from .self_influence import SharedTrain, featurize_shared
from .store import checkpoint_store
from .train_stream import TrainStream


class Pair(NamedTuple):
    """One (query chunk, train batch) pair of a pass."""

    query_offset: int  # the chunk's first query column
    query: torch.Tensor  # (n_q, steps_q, D), or (n_q, D) summed over steps
    train_offset: int  # the batch's first train row (of this rank's rows when sharded)
    train: torch.Tensor  # (b, steps_tr, D), or (b, D) summed over steps
    train_steps: int


@dataclass(frozen=True)
class CheckpointPass:
    """One checkpoint's pass: its weight ``eta_k``, its pairs, and the train stream behind them
    (whose ``counts`` are complete once ``pairs`` is exhausted)."""

    weight: float
    pairs: Iterator[Pair]
    train: TrainStream | SharedTrain


def checkpoint_passes(
    featurizer: Featurizer,
    options: RunOptions,
    sharding: Sharding | LocalSharding,
    *,
    per_step_train: bool,
    per_step_query: bool,
    estimator: dict[str, Any],
) -> Iterator[CheckpointPass]:
    """Per checkpoint of ``options``: load it into the model (eval mode), then yield its pass.

    ``per_step_*`` keep the per-step features of that side (else summed over steps);
    ``estimator`` is the estimator's part of a feature store's identity (:mod:`sdi.store`).
    Sharded, the pairs hold only this rank's train batches, and every rank first checks that all
    ranks were given the same checkpoints, settings, parameters and number of train batches
    (:meth:`sdi.distributed.Sharding.check_same`); errors reach the other ranks through the
    estimator's :func:`sdi.distributed.failures_shared`. The model's train/eval mode is restored at
    the end.
    """
    # stacklevel 4: above this generator, the influence stage and the estimator's method: the user.
    warn_if_shuffled(options.train_loader, "train_loader", stacklevel=4)
    warn_if_shuffled(options.query_loader, "query_loader", stacklevel=4)
    model = featurizer.model
    digests = None  # the checkpoints' content fingerprints, where something needs them
    if options.train_store is not None or sharding.world > 1:
        digests = [checkpoint_fingerprint(spec.path) for spec in options.checkpoints]
    if sharding.world > 1:
        sharding.check_same(
            {
                **estimator,
                "checkpoints": [d[:16] for d in digests],
                "checkpoint weights": [spec.weight for spec in options.checkpoints],
                "params": [b.name for b in featurizer.blocks],
                "model": model_fingerprint(model),
                "train batches": count_batches(options.train_loader),
            }
        )
    inputs = None if options.train_store is None else feature_inputs(featurizer, options.loss_fn)
    was_training = model.training
    try:
        for k, spec in enumerate(
            tqdm(
                options.checkpoints,
                desc=str(options.progress_desc),
                disable=not options.progress,
                dynamic_ncols=True,
            )
        ):
            weight = load_checkpoint_into(
                model,
                spec,
                options.load_checkpoint_fn,
                options.load_model_state_dict_fn,
                options.eta_from_checkpoint_fn,
                index=k,
            )
            store = None
            if options.train_store is not None:
                store = checkpoint_store(
                    options.train_store,
                    spec.path,
                    digest=digests[k],
                    estimator=estimator,
                    inputs=inputs,
                    blocks=featurizer.blocks,
                    per_step=per_step_train,
                    sharding=sharding,
                )
            with tqdm(
                desc="train batches", unit="batch", leave=False, disable=not options.progress
            ) as bar:
                shared = None
                if _self_influence(options, sharding):  # one featurisation for both sides
                    shared = featurize_shared(
                        featurizer,
                        options.train_loader,
                        options.loss_fn,
                        per_step_train=per_step_train,
                        per_step_query=per_step_query,
                        max_bytes=options.max_query_bytes,
                        after_batch=lambda: bar.update(1),
                    )
                if shared is not None:
                    train = shared.train
                    pairs = (Pair(0, shared.query, r0, f, s) for r0, f, s in shared.train)
                    yield CheckpointPass(weight, pairs, train)
                    continue
                train = TrainStream(
                    featurizer,
                    sharding.owned(options.train_loader),
                    options.loss_fn,
                    per_step=per_step_train,
                    store=store,
                    after_batch=lambda: bar.update(1),
                    may_be_empty=sharding.may_own_no_batch,
                    name=rows_name("train_loader", sharding),
                    on_store_rows=lambda c: bar.set_postfix(
                        served_rows=c.served_rows, stored_rows=c.stored_rows, refresh=False
                    ),
                )
                chunks = query_chunks(
                    featurizer,
                    options.query_loader,
                    options.loss_fn,
                    per_step=per_step_query,
                    max_bytes=options.max_query_bytes,
                )
                pairs = (
                    Pair(j0, query, r0, feats, steps)
                    for j0, query in chunks
                    for r0, feats, steps in train
                )
                yield CheckpointPass(weight, pairs, train)
    finally:
        model.train(was_training)


def _self_influence(options: RunOptions, sharding: Sharding | LocalSharding) -> bool:
    """Whether one featurisation serves both sides (:mod:`sdi.self_influence`): the same loader
    object, one process, and no train store (whose stored features are read instead)."""
    same = options.train_loader is options.query_loader
    return same and options.train_store is None and sharding.world == 1


def feature_inputs(featurizer: Featurizer, loss_fn: LossFn) -> dict[str, Any]:
    """What train features depend on besides the estimator, the checkpoint and the batches: the
    model's structure (loop counts included), the ``loss_fn``'s code and constants
    (:mod:`sdi.fingerprints`, with its limits) and the featurizer's settings that change them."""
    return {
        "model": model_fingerprint(featurizer.model),
        "loss_fn": loss_fn_fingerprint(loss_fn),
        "featurizer": {
            "loss_reduction": featurizer.loss_reduction,
            "batch_first": featurizer.batch_first,
            "allow_mixed_steps": featurizer.allow_mixed_steps,
        },
    }
