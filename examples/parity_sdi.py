"""Step-decomposed influence on bit-string parity: which training strings mattered, at which step.

    python examples/parity_sdi.py [--out DIR] [--projection-size 4096] [--report FILE.html]

1. trains a looped transformer (one block, looped 8 times) to output the running parity of 8-bit
   strings, on the CPU in well under two minutes, saving four checkpoints along the way (with the
   optimizer state, so each checkpoint's learning rate is its TracIn weight);
2. computes projected SDI across the checkpoints for 64 training strings and 4 held-out queries,
   with the step x step matrix, and checks it against the exact baseline;
3. prints, per query, the top training strings and their influence at each loop step, and how the
   influence of the top ones is spread over the steps;
4. explains the top (train, query) pair exactly (``explain``): which bit positions of each string
   and which weights (attention or MLP) carried its influence, at which step;
5. saves the plots of :mod:`sdi.plot` (to a temporary folder unless ``--out`` is given);
6. with ``--report FILE.html``, writes the browsable report of :mod:`sdi.report`: per query its top
   training strings with TracIn +- SE, their SDI over the loop steps and, explained, by bit position
   and by weights (attention / MLP).

A looped model can compute running parity one position per loop step (position ``t`` needs the
parity at ``t - 1``), so the loop steps have distinct jobs and SDI can tell them apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI, plot
from sdi.toy import LoopedTransformer

BITS, LOOPS, TRAIN_STEPS = 8, 8, 1000
GROUPS = {"attention": r"qkv|proj", "mlp": r"fc"}  # parameter groups of the explanations


def parity_data(n: int, seed: int) -> dict:
    """``n`` random bit strings ``(n, BITS)`` and their running parities (same shape)."""
    bits = torch.randint(0, 2, (n, BITS), generator=torch.Generator().manual_seed(seed))
    return {"bits": bits, "parity": bits.cumsum(dim=1) % 2}


def parity_loss(model: LoopedTransformer, batch: dict) -> torch.Tensor:
    """Per-example mean cross-entropy of the running parity at every position: ``(B,)``."""
    logits = model(batch["bits"])  # (B, BITS, 2): the "vocabulary" is {0, 1}
    per_bit = F.cross_entropy(logits.flatten(0, 1), batch["parity"].flatten(), reduction="none")
    return per_bit.view(batch["parity"].shape).mean(dim=1)


def batches(data: dict, size: int) -> list[dict]:
    return [
        {k: v[i : i + size] for k, v in data.items()} for i in range(0, len(data["bits"]), size)
    ]


def accuracy(model: LoopedTransformer, data: dict) -> float:
    """Accuracy of the full-string parity (the last position)."""
    with torch.no_grad():
        pred = model(data["bits"])[:, -1].argmax(-1)
    return (pred == data["parity"][:, -1]).float().mean().item()


def train(model: LoopedTransformer, pool: dict, held_out: dict, out: Path) -> list[CheckpointSpec]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Linear decay: steady late training; each checkpoint's lr (its TracIn weight) shrinks with it.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / (TRAIN_STEPS + 1))
    gen = torch.Generator().manual_seed(0)
    specs = []
    for step in range(1, TRAIN_STEPS + 1):
        idx = torch.randint(0, len(pool["bits"]), (64,), generator=gen)
        loss = parity_loss(model, {k: v[idx] for k, v in pool.items()}).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # keeps training steady
        opt.step()
        sched.step()
        if step % (TRAIN_STEPS // 4) == 0:
            path = out / f"parity_{step:05d}.pt"
            torch.save(
                {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
                path,
            )
            specs.append(CheckpointSpec(str(path)))
            print(
                f"  step {step}: loss {loss.item():.4f}, "
                f"held-out parity accuracy {accuracy(model, held_out):.3f}"
            )
    return specs


def explain_top_pair(est, tracin, train_set, queries, common, out: Path) -> list[Path]:
    """Print and plot where (bit positions) and through which weights the top pair's SDI came."""
    i, j = divmod(int(tracin.argmax()), tracin.shape[1])
    (e,) = est.explain(
        pairs=[(i, j)],
        by_parameter=GROUPS,
        **{k: v for k, v in common.items() if k != "mode"},
    )
    labels = {
        side: [f"{p}:{b}" for p, b in enumerate(data["bits"][row].tolist())]
        for side, data, row in (("train", train_set, i), ("query", queries, j))
    }
    print(f"\ntop pair: train {i}, query {j} (exact explanation)")
    for side in ("train", "query"):
        shares = getattr(e, f"positions_{side}")
        print(f"  {side} bit positions (position:bit), share of SDI summed over steps:")
        print(
            "    "
            + "  ".join(
                f"{t} {v:+.2e}" for t, v in zip(labels[side], shares.sum(1).tolist(), strict=True)
            )
        )
        peak = shares.abs().argmax(0).tolist()
        print(f"    position with the largest |share| at each query step: {peak}")
    for name, share in zip(e.groups, e.by_parameter, strict=True):
        print(f"  {name:>9}: per step " + " ".join(f"{v:+.2e}" for v in share.tolist()))
    from matplotlib.figure import Figure  # only here: the plots need matplotlib

    fig = Figure(figsize=(18, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    plot.position_step_heatmap(e, side="train", tokens=labels["train"], ax=axes[0])
    plot.position_step_heatmap(e, side="query", tokens=labels["query"], ax=axes[1])
    plot.parameter_step_plot(e, ax=axes[2])
    path = out / "explain_top_pair.png"
    fig.savefig(path, dpi=110)
    return [path]


def write_report(est, common, train_set, queries, k: int, path: Path) -> None:
    """The HTML report of the top-``k`` training strings per query, explained (:mod:`sdi.report`)."""
    from sdi import report

    args = {key: v for key, v in common.items() if key != "mode"}
    se = est.influence_across_checkpoints(
        mode="tracin", with_standard_errors=True, **args
    ).tracin_se
    top = est.top_influences(k=k, explain=GROUPS, **args)
    report.write_html(
        path,
        top,
        train_tokens=train_set["bits"],
        query_tokens=queries["bits"],
        join="",  # bit strings read as 10110010
        tracin_se=se,
        title=f"Running parity of {BITS}-bit strings: which training strings, at which loop step",
    )
    print(f"\nwrote the report to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for plots and checkpoints")
    parser.add_argument("--projection-size", type=int, default=4096)
    parser.add_argument("--top", type=int, default=3, help="training strings shown per query")
    parser.add_argument("--report", type=Path, default=None, help="write the HTML report here")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: extra threads only add wake-up latency

    model = LoopedTransformer(vocab=2, d_model=32, n_heads=4, loop_steps=LOOPS, max_len=BITS)
    pool, held_out = parity_data(4096, seed=1), parity_data(1024, seed=2)
    train_set = {k: v[:64] for k, v in pool.items()}
    queries = parity_data(4, seed=3)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        print(f"training on running parity of {BITS}-bit strings, {LOOPS} loop steps")
        specs = train(model, pool, held_out, out)
        common = dict(
            checkpoints=specs,
            train_loader=batches(train_set, 32),
            query_loader=batches(queries, 4),
            loss_fn=parity_loss,
            mode="sdi",
        )
        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=args.projection_size
        )
        res = est.influence_across_checkpoints(with_step_matrix=True, **common)
        if args.report is not None:
            write_report(est, common, train_set, queries, args.top, args.report)
        est.close()
        exact_est = FullGradientTracInSDI(model=model, target_modules=model.core)
        exact = exact_est.influence_across_checkpoints(**common)
        rel = ((res.sdi - exact.sdi).norm() / exact.sdi.norm()).item()
        print(
            f"SDI {tuple(res.sdi.shape)} over {len(specs)} checkpoints; "
            f"relative error vs exact {rel:.3f} (m={args.projection_size})"
        )

        saved = []
        for j in range(res.sdi.shape[1]):
            bits = "".join(map(str, queries["bits"][j].tolist()))
            print(f"\nquery {j}: bits {bits}, parity {queries['parity'][j, -1].item()}")
            top = plot.top_train(res.sdi, j, args.top)
            for i in top:
                train_bits = "".join(map(str, train_set["bits"][i].tolist()))
                steps = " ".join(f"{v:+.2e}" for v in res.sdi[i, j].tolist())
                print(
                    f"  train {i:2d} ({train_bits}): TracIn {res.tracin[i, j].item():+.3e}; "
                    f"per step {steps}"
                )
            share = res.sdi[torch.as_tensor(top), j].abs().sum(0)
            share = share / share.sum()
            print(
                "  share of |SDI| of these per step: "
                + " ".join(f"{v:.2f}" for v in share.tolist())
            )
            paths = [out / f"{name}_q{j}.png" for name in ("sdi", "steps", "step_matrix")]
            plot.sdi_heatmap(res.sdi, j, k=10, path=paths[0])
            plot.step_influence(res.sdi, j, k=args.top, path=paths[1])
            plot.step_matrix_heatmap(res.sdi_matrix, int(top[0]), j, path=paths[2])
            saved += paths
        saved += explain_top_pair(exact_est, res.tracin, train_set, queries, common, out)
        exact_est.close()
        print(
            f"\nsaved {len(saved)} plots to {out}"
            + ("" if args.out else " (a temporary folder: pass --out to keep them)")
        )
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
