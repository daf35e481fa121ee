"""SDI on a model from ``transformers``: ALBERT, whose one layer group is applied at every layer.

    python examples/hf_looped_lm_sdi.py [--out DIR] [--train-steps 30] [--projection-size 2048]

1. builds ``AlbertForMaskedLM`` from a small ``AlbertConfig`` (random weights, nothing
   downloaded): 4 layers sharing one layer group, so the group is a loop of 4 steps;
2. trains it for a few steps on a synthetic copy task (the second half of each sequence repeats
   the first; masked tokens of the second half are predicted) and writes Trainer-style checkpoint
   folders ``checkpoint-N/`` as ``transformers.Trainer`` does: ``model.safetensors`` and
   ``config.json`` from ``save_pretrained``, ``optimizer.pt`` and a ``trainer_state.json`` whose
   ``log_history`` holds the learning rate logged every few steps;
3. computes SDI across those folders with ``target_modules`` = the shared layer group, each
   folder's weight ``eta_k`` read from its ``trainer_state.json``, checks it against the exact
   baseline, prints the top training examples of a query with their per-step influence, and saves
   a step plot (to a temporary folder unless ``--out`` is given).

Runs on the CPU in about ten seconds, most of it importing ``transformers``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AlbertConfig, AlbertForMaskedLM, TrainerState

from sdi import FullGradientTracInSDI, ProjectedTracInSDI, plot
from sdi.checkpoints import default_load_checkpoint, eta_and_source

VOCAB, HALF, MASK_ID, LAYERS = 24, 6, 1, 4  # tokens 2.. are content; 1 is [MASK]
LOG_EVERY, SAVE_EVERY, BATCH = 5, 10, 16


def copy_task(n: int, seed: int) -> dict:
    """``n`` sequences ``x + x`` (``2 * HALF`` tokens) with half of the second copy masked.

    ``input_ids (n, 2 HALF)``; ``labels (n, 2 HALF)``: the token at masked places, -100 elsewhere.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(2, VOCAB, (n, HALF), generator=g)
    tokens = torch.cat([first, first], dim=1)
    masked = torch.zeros_like(tokens, dtype=torch.bool)
    masked[:, HALF:] = torch.rand(n, HALF, generator=g) < 0.5
    masked[:, -1] |= ~masked[:, HALF:].any(dim=1)  # at least one masked token per example
    return {
        "input_ids": tokens.masked_fill(masked, MASK_ID),
        "labels": tokens.masked_fill(~masked, -100),
    }


def batches(data: dict, size: int) -> list[dict]:
    n = len(data["input_ids"])
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def loss_fn(model: AlbertForMaskedLM, batch: dict) -> torch.Tensor:
    """Per-example mean cross-entropy over the masked tokens: ``(B,)``."""
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, vocab)
    labels = batch["labels"]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    masked = labels != -100
    return (per_token * masked).sum(dim=1) / masked.sum(dim=1)


def make_model(seed: int = 0) -> AlbertForMaskedLM:
    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=32,
        hidden_size=64,
        num_hidden_layers=LAYERS,  # LAYERS uses of ...
        num_hidden_groups=1,  # ... one shared layer group
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=2 * HALF,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return AlbertForMaskedLM(config)


def save_trainer_checkpoint(folder: Path, model, optimizer, step: int, history: list) -> None:
    """What ``transformers.Trainer`` writes at a save step (weights, optimizer, trainer state)."""
    model.save_pretrained(folder)  # model.safetensors (tied decoder weight left out) + config.json
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    state = TrainerState(
        global_step=step,
        max_steps=0,
        logging_steps=LOG_EVERY,
        save_steps=SAVE_EVERY,
        train_batch_size=BATCH,
        log_history=list(history),
    )
    state.save_to_json(str(folder / "trainer_state.json"))


def train(model, data: dict, steps: int, out: Path) -> list[Path]:
    """AdamW with a linearly decaying learning rate; a checkpoint folder every ``SAVE_EVERY``
    steps (and at the end). Returns the folders in order."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / (steps + 1))
    loader = batches(data, BATCH)
    history, folders = [], []
    model.train()
    for step in range(1, steps + 1):
        loss = loss_fn(model, loader[(step - 1) % len(loader)]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % LOG_EVERY == 0:  # as Trainer logs: the learning rate now in force
            lr = schedule.get_last_lr()[0]
            history.append({"loss": loss.item(), "learning_rate": lr, "step": step})
        if step % SAVE_EVERY == 0 or step == steps:
            folders.append(out / f"checkpoint-{step}")
            save_trainer_checkpoint(folders[-1], model, optimizer, step, history)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for checkpoints and plots")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--projection-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        train_data, query_data = copy_task(64, seed=1), copy_task(6, seed=2)
        model = make_model()
        folders = train(model, train_data, args.train_steps, out)
        for folder in folders:
            eta, source = eta_and_source(default_load_checkpoint(folder))
            print(f"{folder.name}: eta = {eta:.3e} from {source}")

        # The shared layer group is used once per layer: its parameters' uses are the steps.
        core = model.albert.encoder.albert_layer_groups[0]
        common = dict(
            checkpoints=folders,  # paths: CheckpointSpec(path), eta from each folder
            train_loader=batches(train_data, BATCH),
            query_loader=batches(query_data, BATCH),
            loss_fn=loss_fn,
        )
        est = ProjectedTracInSDI(
            model=model, target_modules=core, projection_size=args.projection_size
        )
        result = est.influence_across_checkpoints(mode="sdi", **common)
        top = est.top_influences(k=3, **common)
        est.close()
        exact_est = FullGradientTracInSDI(model=model, target_modules=core)
        exact = exact_est.influence_across_checkpoints(mode="sdi", **common)
        exact_est.close()

        sdi, tracin = result.sdi, result.tracin  # (64, 6, LAYERS), (64, 6)
        rel = ((tracin - exact.tracin).norm() / exact.tracin.norm()).item()
        print(f"SDI {tuple(sdi.shape)} (train, query, step); TracIn {tuple(tracin.shape)}")
        print(f"projected vs exact TracIn, relative error: {rel:.3f} (m={args.projection_size})")
        print("query 0: most influential training examples, influence per layer (= loop step)")
        for rank in range(top.most_indices.shape[1]):
            i = top.most_indices[0, rank].item()
            steps = " ".join(f"{v:+.2e}" for v in top.most_sdi[0, rank].tolist())
            print(f"  train {i:2d}: TracIn {top.most_tracin[0, rank]:+.3e}  per step [{steps}]")

        figure = out / "step_influence.png"
        labels = [f"layer {t}" for t in range(sdi.shape[2])]
        plot.step_influence(sdi, query=0, k=3, step_labels=labels, path=figure)
        print(f"plot: {figure if args.out else '(temporary folder; pass --out to keep it)'}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
