"""SDI with the train set sharded over processes (CPU, gloo):

    torchrun --standalone --nproc_per_node=2 examples/distributed_sdi.py

Every rank builds the same toy looped transformer and loaders; rank 0 trains it briefly and writes
two checkpoints to a temporary folder that all ranks share. Each rank featurises the train batches
``i`` with ``i % world_size == rank`` (and the whole query set), writing its train features to its
own store folder; rank 0 receives SDI / TracIn in the loader's order and the merged top-3 examples
per query, and prints them. Then, with the process group closed, rank 0 recomputes everything in
one process and checks that the answers match.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from sdi import CheckpointSpec, ProjectedTracInSDI
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches

VOCAB, SEQ, STEPS = 64, 16, 4


def make_model() -> LoopedTransformer:
    torch.manual_seed(0)
    return LoopedTransformer(vocab=VOCAB, d_model=32, n_heads=2, loop_steps=STEPS, max_len=SEQ)


def write_checkpoints(folder: Path, train) -> None:
    """Two checkpoints of a short Adam run, each with its optimizer state (hence its lr)."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for name in ("ckpt_0.pt", "ckpt_1.pt"):
        for batch in train:
            opt.zero_grad()
            next_token_loss(model, batch).mean().backward()
            opt.step()
        torch.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
            folder / name,
        )


def run(folder: Path, train, query, store: Path | None):
    """SDI, TracIn and the top 3 per query; in one process, or sharded when a group is up."""
    model = make_model()
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=256, seed=0)
    common = dict(
        checkpoints=[CheckpointSpec(folder / "ckpt_0.pt"), CheckpointSpec(folder / "ckpt_1.pt")],
        train_loader=train,
        query_loader=query,
        loss_fn=next_token_loss,
        train_store=store,
    )
    out = est.influence_across_checkpoints(**common)  # gather_to=0: None on the other ranks
    top = est.top_influences(k=3, **common)  # reads the train features the first call stored
    est.close()
    return out, top


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    train = random_token_batches(44, 8, SEQ, VOCAB, seed=1)  # 6 batches, the last one ragged
    query = random_token_batches(6, 3, SEQ, VOCAB, seed=2)

    shared = [tempfile.mkdtemp(prefix="sdi-dist-") if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    folder = Path(shared[0])
    if rank == 0:
        write_checkpoints(folder, train)
    dist.barrier()

    out, top = run(folder, train, query, store=folder / "store")
    dist.destroy_process_group()
    if rank != 0:
        assert out is None and top is None
        return

    print(f"{world} ranks, {len(train)} train batches: rank r featurised batches r, r+{world}, ...")
    print(f"sdi {tuple(out.sdi.shape)}, tracin {tuple(out.tracin.shape)}")
    for path in sorted((folder / "store").glob("*/rank*")):
        print(f"  store shard folder: {path.parent.name}/{path.name}")
    print("query 0, most influential train examples:")
    for i, score, steps in zip(
        top.most_indices[0], top.most_tracin[0], top.most_sdi[0], strict=True
    ):
        print(
            f"  train {int(i):3d}  TracIn {score:+.4f}  per step {[round(s, 4) for s in steps.tolist()]}"
        )

    single_out, single_top = run(folder, train, query, store=None)  # no group any more: one process
    for name in ("sdi", "tracin"):
        torch.testing.assert_close(getattr(out, name), getattr(single_out, name))
    for name in ("most_indices", "most_tracin", "most_sdi", "least_indices", "least_sdi"):
        torch.testing.assert_close(getattr(top, name), getattr(single_top, name))
    print("sharded results match the single-process run")
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
