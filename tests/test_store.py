"""Feature stores: their identity and folder, so that stores written before stay readable."""

from __future__ import annotations

import hashlib
import json

from conftest import save_checkpoint

import sdi
from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.toy import next_token_loss


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
