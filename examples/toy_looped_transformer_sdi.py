"""Toy looped transformer, end to end: train, checkpoint, projected SDI, fast TracIn, exact check.

    python examples/toy_looped_transformer_sdi.py [--device cpu|cuda] [--out DIR]

1. trains a tiny looped transformer (one shared block, looped 4 times) on random tokens, saving
   three checkpoints (to a temporary folder unless ``--out`` is given);
2. computes projected SDI (sketched during backward) and fast TracIn (``mode="tracin"``);
3. checks conservation against the exact baseline: the exact SDI, summed over steps, must equal
   TracIn computed independently from plain autograd gradients of each example's loss;
4. prints the five most influential training examples for query 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI, backend_info
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches

VOCAB, SEQ, STEPS = 64, 16, 4


def train(model, batches, out_dir: Path, device) -> list[CheckpointSpec]:
    """A few epochs of Adam; a checkpoint (with its optimizer state, hence its lr) after each."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    specs = []
    for epoch in range(3):
        model.train()
        for batch in batches:
            opt.zero_grad()
            next_token_loss(model, batch).mean().backward()
            opt.step()
        path = out_dir / f"ckpt_{epoch:04d}.pt"
        torch.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path
        )
        specs.append(CheckpointSpec(path))
        print(
            f"  epoch {epoch}: loss {next_token_loss(model, batches[0]).mean().item():.3f} -> {path.name}"
        )
    return specs


def autograd_tracin(model, specs, train_batches, query_batches) -> torch.Tensor:
    """sum_k eta_k <grad l_i, grad l_j> over the core's parameters, one plain backward per example."""
    params = list(model.core.parameters())

    def grads(batches):
        rows = []
        for batch in batches:
            for tokens in batch["tokens"]:
                loss = next_token_loss(model, {"tokens": tokens[None]})[0]
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    total = 0
    for spec in specs:
        ckpt = torch.load(spec.path, weights_only=True)
        model.load_state_dict(ckpt["model_state_dict"])
        model.eval()
        total = (
            total
            + ckpt["optimizer_state_dict"]["param_groups"][0]["lr"]
            * grads(train_batches)
            @ grads(query_batches).T
        )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--out", type=Path, default=None, help="checkpoint folder (default: a temporary one)"
    )
    parser.add_argument("--projection-size", type=int, default=4096)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"sketch backend: {backend_info()}")

    model = LoopedTransformer(vocab=VOCAB, d_model=32, n_heads=4, loop_steps=STEPS, max_len=SEQ).to(
        device
    )
    train_batches = random_token_batches(64, 16, SEQ, VOCAB, seed=1)
    query_batches = random_token_batches(8, 8, SEQ, VOCAB, seed=2)

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"training a looped transformer ({STEPS} loop steps), checkpoints in {out_dir}")
        specs = train(model, train_batches, out_dir, device)
        common = dict(
            checkpoints=specs,
            train_loader=train_batches,
            query_loader=query_batches,
            loss_fn=next_token_loss,
        )

        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=args.projection_size
        )
        out = est.influence_across_checkpoints(mode="sdi", **common)
        fast = est.influence_across_checkpoints(mode="tracin", **common)
        est.close()
        print(
            f"projected SDI {tuple(out.sdi.shape)}  TracIn {tuple(out.tracin.shape)}  fast TracIn {tuple(fast.tracin.shape)}"
        )

        exact_est = FullGradientTracInSDI(model=model, target_modules=model.core)
        exact = exact_est.influence_across_checkpoints(mode="sdi", **common)
        exact_est.close()
        reference = autograd_tracin(model, specs, train_batches, query_batches)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print("conservation: exact SDI summed over steps vs TracIn from plain autograd gradients")
    print(f"  relative difference {rel(exact.sdi.sum(-1), reference):.2e}")
    assert rel(exact.sdi.sum(-1), reference) < 1e-4, "conservation violated"
    print(
        f"projected vs exact (m={args.projection_size}): SDI rel. error {rel(out.sdi, exact.sdi):.3f}, "
        f"TracIn rel. error {rel(fast.tracin, exact.tracin):.3f}"
    )
    top = torch.topk(out.tracin[:, 0], 5).indices.tolist()
    print(f"top-5 train indices for query 0 (projected TracIn): {top}")
    print(
        f"  their exact TracIn ranks: {[int((exact.tracin[:, 0] > exact.tracin[i, 0]).sum()) for i in top]}"
    )
    print(
        f"  SDI trajectory of the top one over {out.sdi.shape[-1]} steps: {[round(v, 4) for v in out.sdi[top[0], 0].tolist()]}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
