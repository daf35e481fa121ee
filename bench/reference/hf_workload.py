"""The HF-model CPU workload (DESIGN §5), runnable under this package and under
``step-decomposed-influence`` 0.1.1.

``AlbertForMaskedLM`` from ``transformers``, built from a config (random weights, nothing
downloaded): hidden 128, 4 heads, intermediate 512, vocabulary 256, 8 layers that all use one
shared layer group (so ``target_modules`` = that group, used 8 times per pass), seq 64, batch 32,
128 train + 16 query examples, 2 checkpoints (seeds 0 and 1, weights 1.0 and 0.5),
``projection_size=2048``. Loss: per-example mean cross-entropy over the masked tokens (15 %).
It imports only the public ``sdi`` API that both packages share.

``python bench/reference/hf_workload.py --mode sdi --repeats 2 --out result.pt`` times ``repeats`` calls of
``influence_across_checkpoints`` after one warm-up call and saves ``{"seconds", "cpu_seconds",
"first_seconds", "tracin", "sdi", "package"}`` (as ``bench/speed/workload.py`` does). With
``--with-train-step`` each timed call is followed by a plain forward + backward with parameter
gradients over the same batches at each checkpoint (the checkpoint loaded first, as the estimator
does), timed too (``"train_step_seconds"``, ``"train_step_cpu_seconds"``): paired in one process, the ratio of the two stays
meaningful on a machine whose load changes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 256, 128, 4, 8, 64
BATCH, N_TRAIN, N_QUERY, M = 32, 128, 16, 2048
WEIGHTS = (1.0, 0.5)  # eta of the two checkpoints
MASK_ID = 1


def make_model(seed: int):
    from transformers import AlbertConfig, AlbertForMaskedLM

    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=HIDDEN,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_hidden_groups=1,
        inner_group_num=1,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return AlbertForMaskedLM(config).eval()


def loss_fn(model, batch: dict) -> torch.Tensor:
    """Per-example mean cross-entropy over the masked tokens ``(B,)``."""
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    masked = labels != -100
    return (per_token * masked).sum(dim=1) / masked.sum(dim=1)


def batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    masked = torch.rand(n, SEQ, generator=g) < 0.15
    masked[:, 0] = True  # every example has a masked token
    data = {
        "input_ids": tokens.masked_fill(masked, MASK_ID),
        "labels": tokens.masked_fill(~masked, -100),
    }
    return [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, n, BATCH)]


def setup(workdir: Path):
    """The model, its two checkpoint files, the train and query loaders."""
    paths = []
    for seed in range(len(WEIGHTS)):
        path = workdir / f"ckpt{seed}.pt"
        torch.save({"model_state_dict": make_model(seed).state_dict()}, path)
        paths.append(path)
    return make_model(0), paths, batches(N_TRAIN, seed=1), batches(N_QUERY, seed=2)


def influence(est, paths, train, query, mode: str):
    from sdi import CheckpointSpec

    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(str(p), weight=w) for p, w in zip(paths, WEIGHTS, strict=True)],
        train_loader=train,
        query_loader=query,
        loss_fn=loss_fn,
        mode=mode,
    )


def train_step(model, paths, loaders) -> None:
    """Per checkpoint: load it, then a plain forward + backward with parameter gradients over
    every batch of ``loaders`` -- the work of one training step on each of the same batches."""
    for path in paths:
        model.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
        for loader in loaders:
            for batch in loader:
                model.zero_grad(set_to_none=True)
                loss_fn(model, batch).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-train-step", action="store_true")
    parser.add_argument("--mode", choices=["sdi", "tracin"], default="sdi")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import sdi
    from sdi import ProjectedTracInSDI

    with tempfile.TemporaryDirectory() as tmp:
        model, paths, train, query = setup(Path(tmp))
        core = model.albert.encoder.albert_layer_groups[0]
        est = ProjectedTracInSDI(model=model, target_modules=core, projection_size=M)
        run = lambda: influence(est, paths, train, query, args.mode)  # noqa: E731
        step = lambda: train_step(model, paths, (query, train))  # noqa: E731
        start = time.perf_counter()
        result = run()  # warm-up: the first call of a fresh process, timed on its own
        first_seconds = time.perf_counter() - start
        if args.with_train_step:
            step()  # its warm-up
        seconds, cpu_seconds, step_seconds, step_cpu_seconds = [], [], [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            if args.with_train_step:
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                step_seconds.append(time.perf_counter() - start)
                step_cpu_seconds.append(time.process_time() - cpu_start)
    print(" ".join(f"{s:.3f}" for s in seconds), "| plain step:", step_seconds)
    if args.out is not None:
        torch.save(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "first_seconds": first_seconds,
                "train_step_seconds": step_seconds,
                "train_step_cpu_seconds": step_cpu_seconds,
                "tracin": None if result is None else result.tracin,
                "sdi": None if result is None else result.sdi,
                "package": sdi.__file__,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
