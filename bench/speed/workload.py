"""The CPU benchmark workload, runnable under this package and under ``step-decomposed-influence``.

It imports only the public ``sdi`` API (``ProjectedTracInSDI``, ``CheckpointSpec``), which both
packages share, and carries its own copy of the toy looped transformer (``sdi.toy`` exists only
here). The workload (DESIGN §5): d_model 128, 4 heads, 8 loop steps, seq 64, batch 32, 128 train +
32 query examples, ``projection_size=1024``, ``target_modules=model.core``, one checkpoint.

``python bench/speed/workload.py --mode sdi --repeats 3 --out result.pt`` times ``repeats`` calls of
``influence_across_checkpoints`` after one warm-up call and saves ``{"seconds": [...] (wall),
"cpu_seconds": [...] (process CPU time), "first_seconds": the warm-up call (the first call of a
fresh process), "tracin": (N_train, N_query), "sdi": (N_train, N_query, steps) or None,
"package": where sdi was imported from}``. ``--what train-step`` times a plain forward + backward
with parameter gradients over the same examples instead, and ``--what activation-only`` one with
every parameter frozen and no sketches (the floor of featurisation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, D_MODEL, HEADS, STEPS, SEQ = 256, 128, 4, 8, 64
BATCH, N_TRAIN, N_QUERY, M = 32, 128, 32, 1024


class Block(nn.Module):
    """Causal self-attention + residual, parameter-free LayerNorm, GELU MLP + residual."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Looped(nn.Module):
    """Embedding + positions, ``Block`` applied ``steps`` times (shared weights), bias-free head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        self.core = Block(D_MODEL, HEADS)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for _ in range(STEPS):
            x = self.core(x)
        return self.head(x)


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-example mean next-token cross-entropy ``(B,)``."""
    tokens = batch["tokens"]
    logits = model(tokens)[:, :-1]
    per_token = F.cross_entropy(
        logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return per_token.view(tokens.shape[0], -1).mean(dim=1)


def batches(n: int, seed: int) -> list[dict]:
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"tokens": tokens[i : i + BATCH]} for i in range(0, n, BATCH)]


def setup(workdir: Path):
    """The model (seed 0, eval mode), its checkpoint file, the train and query loaders."""
    torch.manual_seed(0)
    model = Looped().eval()
    ckpt = workdir / "ckpt.pt"
    torch.save({"model_state_dict": model.state_dict()}, ckpt)
    return model, ckpt, batches(N_TRAIN, seed=1), batches(N_QUERY, seed=2)


def influence(est, ckpt: Path, train, query, mode: str):
    from sdi import CheckpointSpec

    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(str(ckpt), weight=1.0)],
        train_loader=train,
        query_loader=query,
        loss_fn=loss_fn,
        mode=mode,
    )


def train_step(model: nn.Module, loaders) -> None:
    """A plain forward + backward with parameter gradients over every batch of ``loaders``."""
    for loader in loaders:
        for batch in loader:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).sum().backward()


def activation_only_step(model: nn.Module, loaders) -> None:
    """Forward + backward with every parameter frozen, over every batch of ``loaders``: no sketches.

    Backward computes activation gradients only, from the looped core's first input (made a leaf
    that requires grad) to the loss -- what featurisation needs before any sketch math, so the
    time of this step bounds how fast any featurisation of this model can be.
    """

    def leaf_input(module, args):
        return None if args[0].requires_grad else (args[0].detach().requires_grad_(), *args[1:])

    flags = [p.requires_grad for p in model.parameters()]
    handle = model.core.register_forward_pre_hook(leaf_input)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for loader in loaders:
            for batch in loader:
                loss_fn(model, batch).sum().backward()
    finally:
        handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--what", choices=["influence", "train-step", "activation-only"], default="influence"
    )
    parser.add_argument("--mode", choices=["sdi", "tracin"], default="sdi")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import sdi
    from sdi import ProjectedTracInSDI

    with tempfile.TemporaryDirectory() as tmp:
        model, ckpt, train, query = setup(Path(tmp))
        if args.what == "train-step":
            run = lambda: train_step(model, (query, train))  # noqa: E731
        elif args.what == "activation-only":
            run = lambda: activation_only_step(model, (query, train))  # noqa: E731
        else:
            est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=M)
            run = lambda: influence(est, ckpt, train, query, args.mode)  # noqa: E731
        start = time.perf_counter()
        result = run()  # warm-up: the first call of a fresh process, timed on its own
        first_seconds = time.perf_counter() - start
        seconds, cpu_seconds = [], []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    print(" ".join(f"{s:.3f}" for s in seconds))
    if args.out is not None:
        torch.save(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "first_seconds": first_seconds,
                "tracin": None if result is None else result.tracin,
                "sdi": None if result is None else result.sdi,
                "package": sdi.__file__,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
