"""The checkpoint loop (sdi.passes): one pass per checkpoint, every query chunk paired with every
train batch, and memory that does not grow with the train set beyond the output."""

from __future__ import annotations

import gc
import warnings

import torch
from conftest import save_checkpoint, sketched, tiny_model

from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.checkpoints import (
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from sdi.distributed import LocalSharding
from sdi.options import RunOptions
from sdi.passes import Pair, checkpoint_passes
from sdi.toy import next_token_loss, random_token_batches


def test_pairs_cover_every_query_chunk_and_train_batch(tmp_path, train_batches, query_batches):
    model = tiny_model()
    a = save_checkpoint(tmp_path / "a.pt", model, lr=0.25)
    b = save_checkpoint(tmp_path / "b.pt", tiny_model(seed=4))
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16)
    options = RunOptions(
        checkpoints=[CheckpointSpec(a), CheckpointSpec(b, weight=2.0)],
        train_loader=train_batches,  # 7 examples in batches of 3, 3, 1
        query_loader=query_batches,  # 4 examples in one batch of 4
        loss_fn=next_token_loss,
        load_checkpoint_fn=default_load_checkpoint,
        load_model_state_dict_fn=default_load_model_state_dict,
        eta_from_checkpoint_fn=default_eta_from_checkpoint,
        max_query_bytes=1,  # every query batch is a chunk of its own
    )
    width = 16 * len(list(model.core.parameters()))  # m columns per selected parameter
    model.train()
    passes = checkpoint_passes(
        est._featurizer,
        options,
        LocalSharding(),
        per_step_train=False,
        per_step_query=True,
        estimator={"estimator": "test"},
    )
    weights = []
    for checkpoint in passes:
        assert not model.training  # featurised in eval mode
        assert checkpoint.train.counts == []  # nothing counted before the pairs are consumed
        pairs = list(checkpoint.pairs)
        weights.append(checkpoint.weight)
        assert all(isinstance(p, Pair) for p in pairs)
        assert [(p.query_offset, p.train_offset) for p in pairs] == [(0, 0), (0, 3), (0, 6)]
        assert [tuple(p.train.shape) for p in pairs] == [(3, width), (3, width), (1, width)]
        assert {tuple(p.query.shape) for p in pairs} == {(4, 3, width)}
        assert {p.train_steps for p in pairs} == {3}
        assert checkpoint.train.counts == [3, 3, 1]
    assert weights == [0.25, 2.0]
    assert model.training  # restored
    want = dict(tiny_model(seed=4).named_parameters())
    for name, p in model.named_parameters():  # the last checkpoint is loaded
        torch.testing.assert_close(p, want[name])


def _peak_live_tensor_bytes(est, path, train, query):
    """Most bytes of live torch tensors seen at any featurised batch of a streaming run."""
    peak = [0]

    def loss_fn(model, batch):
        gc.collect()
        with warnings.catch_warnings():  # touching deprecated torch objects warns
            warnings.simplefilter("ignore")
            live = sum(
                o.numel() * o.element_size()
                for o in gc.get_objects()
                if isinstance(o, torch.Tensor)
            )
        peak[0] = max(peak[0], live)
        return next_token_loss(model, batch)

    out = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path)], train_loader=train, query_loader=query, loss_fn=loss_fn
    )
    return peak[0], out.sdi.numel() * 4


def test_memory_does_not_grow_with_train_set_beyond_the_output(tmp_path, model):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    query = random_token_batches(3, 3, 7, 19, seed=2)
    est = sketched(model)
    small, small_out = _peak_live_tensor_bytes(
        est, path, random_token_batches(8, 4, 7, 19, seed=1), query
    )
    large, large_out = _peak_live_tensor_bytes(
        est, path, random_token_batches(32, 4, 7, 19, seed=1), query
    )
    # The reference design would keep every train feature: 24 more examples x steps x params x m.
    per_example = 3 * len(list(model.core.parameters())) * 48 * 4
    assert large - small <= (large_out - small_out) + per_example, (small, large, per_example)
