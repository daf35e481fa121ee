"""The checkpoint loop: one pass per checkpoint, every query chunk paired with every train batch."""

from __future__ import annotations

import torch
from conftest import save_checkpoint, tiny_model

from sdi import ProjectedTracInSDI
from sdi.checkpoints import (
    CheckpointSpec,
    default_eta_from_checkpoint,
    default_load_checkpoint,
    default_load_model_state_dict,
)
from sdi.distributed import LocalSharding
from sdi.options import RunOptions
from sdi.passes import Pair, checkpoint_passes
from sdi.toy import next_token_loss


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
