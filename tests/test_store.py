"""Feature stores (sdi.store): resume after interruption, reuse across query sets, refusal of
stale features, and an identity pinned so that stores written before stay readable."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import run_influence, save_checkpoint, sketched, tiny_model

import sdi
from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.toy import next_token_loss, random_token_batches


def test_one_process_store_identity_and_folder_are_pinned(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    sha = hashlib.sha256((tmp_path / "ck.pt").read_bytes()).hexdigest()
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=16, seed=3)
    for with_step_matrix, layout in ((False, "summed"), (True, "per_step")):
        est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(path, weight=1.0)],
            train_loader=train_batches,
            query_loader=query_batches,
            loss_fn=next_token_loss,
            with_step_matrix=with_step_matrix,
            train_store=tmp_path / "store",
        )
        manifest = json.loads(
            (tmp_path / "store" / f"{sha[:16]}-{layout}" / "manifest.json").read_text()
        )
        names = [f"core.{name}" for name, _ in model.core.named_parameters()]
        assert manifest["identity"] == {
            "format": 1,
            "estimator": "projected",
            "seed": 3,
            "projection_size": 16,
            "params": names,
            "widths": [16] * len(names),
            "checkpoint": {"file": "ck.pt", "sha256": sha},
            "layout": layout,
            "dtype": "float32",
            "sdi_version": sdi.__version__,
        }
        assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [3, 3, 1]


def test_store_resumes_after_interruption_and_serves_other_query_sets(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    store = tmp_path / "store"
    est = sketched(model)
    want = run_influence(est, path, train_batches, query_batches)

    class Killed(Exception):
        pass

    def dies_after_two():
        yield from train_batches[:2]
        raise Killed

    with pytest.raises(Killed):
        run_influence(est, path, dies_after_two(), query_batches, train_store=store)
    (folder,) = store.iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]

    calls = []

    def counting_loss(model, batch):
        calls.append(batch["tokens"].shape[0])
        return next_token_loss(model, batch)

    resumed = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=query_batches,
        loss_fn=counting_loss,
        train_store=store,
    )
    torch.testing.assert_close(resumed.sdi, want.sdi)
    assert calls == [4, 1]  # the query batch, then only the train batch not stored yet
    assert json.loads((folder / "manifest.json").read_text())["complete"]

    calls.clear()
    other_query = random_token_batches(2, 2, 7, 19, seed=9)
    reused = est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path, weight=1.0)],
        train_loader=train_batches,
        query_loader=other_query,
        loss_fn=counting_loss,
        train_store=store,
    )
    assert calls == [2]  # train features came from disk
    torch.testing.assert_close(reused.sdi, run_influence(est, path, train_batches, other_query).sdi)


@pytest.mark.parametrize(
    "other",
    [
        lambda m: ProjectedTracInSDI(model=m, target_modules=m.core, projection_size=48, seed=6),
        lambda m: ProjectedTracInSDI(model=m, target_modules=m.core, projection_size=32, seed=5),
        lambda m: ProjectedTracInSDI(
            model=m, target_modules=m.core.fc1, projection_size=48, seed=5
        ),
        lambda m: FullGradientTracInSDI(model=m, target_modules=m.core),
    ],
    ids=["seed", "m", "params", "estimator"],
)
def test_store_refuses_other_settings(tmp_path, model, train_batches, query_batches, other):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    run_influence(sketched(model), path, train_batches, query_batches, train_store=tmp_path / "s")
    model2 = tiny_model()  # same weights, fresh hooks
    with pytest.raises(ValueError, match="written for other settings"):
        run_influence(other(model2), path, train_batches, query_batches, train_store=tmp_path / "s")


def test_store_refuses_another_checkpoint_with_the_same_name(
    tmp_path, model, train_batches, query_batches
):
    path = save_checkpoint(tmp_path / "ck.pt", model)
    est = sketched(model)
    first = run_influence(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    save_checkpoint(
        tmp_path / "ck.pt", tiny_model(seed=3)
    )  # overwritten: new content, new store folder
    second = run_influence(est, path, train_batches, query_batches, train_store=tmp_path / "s")
    assert len(list((tmp_path / "s").iterdir())) == 2
    assert not torch.allclose(first.sdi, second.sdi)
