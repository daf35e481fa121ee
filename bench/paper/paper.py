"""The paper's headline figures at its own scale (arXiv 2602.10097): accuracy and cost.

    python bench/paper/paper.py [--device cpu|cuda] [--scale paper|...|tiny] [--seeds 10]
                                [--choices-scale reduced|small|tiny|none] [--skip-twice]
                                [--set CHOICE=VALUE ...] [--accuracy-only] [--out FILE]

At ``--scale paper``: the 135M looped GPT of ``model.py`` (tau = 32, seq 128, FP32, init std 0.02),
4 random sequences as both train and query set, one checkpoint, ``ProjectedTracInSDI`` with
m = 2048 per parameter tensor of the looped body (48 tensors). It measures, in this order (the
report is rewritten after each stage, so an interrupted run keeps what it finished):

1. exact SDI / TracIn from the oracle (``oracle.py``: per-step parameter copies, plain autograd);
2. projected SDI / TracIn for ``--seeds`` sketch seeds from one featurisation (``seeds.py``), their
   relative errors ``||est - exact||_F / ||exact||_F`` over the whole (4, 4, 32) SDI tensor and
   (4, 4) TracIn matrix, mean and sample std over seeds, beside the paper's;
3. cost: one public projected call (self-influence: the set featurised once), a plain forward and a
   plain forward + backward of the same 4 sequences, time and peak memory (CPU: the process's peak
   RSS over the call, reset before it through ``/proc/self/clear_refs``; CUDA: peak allocated);
4. the open choices of the model (``model.CHOICES``), each alternative against the defaults, at
   ``--choices-scale`` (smaller: its cost is that of the whole paper-scale run per variant);
5. the time saved by featurising once: the same call with the set passed as two loader objects
   (featurised twice), its outputs checked bitwise equal; at ``--choices-scale`` and, unless
   ``--skip-twice``, at ``--scale``.

``make bench-paper`` runs it on the CPU with 2 threads (``OMP_NUM_THREADS``, default 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # model.py, ...; this checkout's sdi first
from model import CHOICES, PaperConfig, build, next_token_loss, random_sequences  # noqa: E402
from oracle import exact_influence  # noqa: E402
from seeds import per_seed_features  # noqa: E402

import sdi  # noqa: E402
from sdi import CheckpointSpec, ProjectedTracInSDI  # noqa: E402

PAPER = {"sdi": (0.0388, 0.0030), "tracin": (0.0220, 0.0052)}
M = 2048
N_SEQ = 4
SCALES = {
    "paper": PaperConfig(),
    "small": PaperConfig(d_model=256, n_heads=4, loop_steps=8),
    "reduced": PaperConfig(vocab=8192, d_model=128, n_heads=4, loop_steps=8),
    "tiny": PaperConfig(vocab=512, d_model=64, n_heads=4, loop_steps=4, seq_len=32),
}


def log(message: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}", flush=True)


class Meter:
    """Wall time and peak memory of one call (CPU: peak RSS; CUDA: peak allocated)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            before = _status_kb("VmRSS") * 1024
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
        return result, {"s": seconds, "peak": peak, "before": before}


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the RSS
        f.write("5")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def relative_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    """``||est - exact||_F / ||exact||_F`` over every entry."""
    exact = exact.double()
    return float((est.double().cpu() - exact).norm() / exact.norm())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def projected_call(model, path: Path, train, query, seed: int = 0):
    est = ProjectedTracInSDI(
        model=model, target_modules=model.recurrent, projection_size=M, seed=seed
    )
    try:
        return est.influence_across_checkpoints(
            checkpoints=[CheckpointSpec(str(path), weight=1.0)],
            train_loader=train,
            query_loader=query,
            loss_fn=next_token_loss,
            mode="sdi",
        )
    finally:
        est.close()


def seed_errors(model, tokens, exact, seeds) -> tuple[dict, torch.Tensor]:
    """Relative errors per seed of SDI and TracIn, and seed ``seeds[0]``'s SDI."""
    feats, _ = per_seed_features(
        model, model.recurrent, {"tokens": tokens}, next_token_loss, M, seeds
    )
    errors = {"sdi": [], "tracin": []}
    first = None
    for query in feats:  # (N, steps, D) per seed
        train = query.sum(dim=1)
        sdi = torch.einsum("id,jtd->ijt", train, query)
        first = sdi if first is None else first
        errors["sdi"].append(relative_error(sdi, exact.sdi))
        errors["tracin"].append(relative_error(sdi.sum(dim=2), exact.tracin))
    return errors, first


def accuracy(config: PaperConfig, device, seeds, progress=log) -> dict:
    """Oracle and per-seed errors of one configuration (its own model and sequences)."""
    model = build(config, seed=0, device=device)
    tokens = random_sequences(N_SEQ, config, seed=1, device=device)
    meter = Meter(device)
    exact, oracle_cost = meter(lambda: exact_influence(model, tokens, next_token_loss, progress))
    progress(f"oracle done in {oracle_cost['s']:.0f} s (consistency {exact.consistency:.1e})")
    (errors, first), seeds_cost = meter(lambda: seed_errors(model, tokens, exact, seeds))
    progress(f"{len(seeds)} seeds featurised once in {seeds_cost['s']:.0f} s")
    return dict(
        model=model,
        tokens=tokens,
        exact=exact,
        errors=errors,
        first_seed_sdi=first,
        oracle_cost=oracle_cost,
        seeds_cost=seeds_cost,
        params=sum(p.numel() for p in model.parameters()),
        body=sum(p.numel() for p in model.recurrent.parameters()),
        body_tensors=len(list(model.recurrent.parameters())),
    )


def cost(acc: dict, device, tmp: Path, twice: bool, repeats: int = 1) -> dict:
    """One public projected call featurising the set once (and, with ``twice``, the same call with
    the set passed as two loaders), a plain forward, a plain forward + backward. With ``repeats``
    > 1, a warm-up call first and then the calls in turn ``repeats`` times: the median time and
    the highest peak of each."""
    model, tokens = acc["model"], acc["tokens"]
    meter = Meter(device)
    path = tmp / "checkpoint.pt"
    torch.save({"model_state_dict": model.state_dict()}, path)
    loader = [{"tokens": tokens}]

    def train_step():
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        next_token_loss(model, {"tokens": tokens}).sum().backward()
        for p in model.parameters():
            p.grad = None

    def forward():
        with torch.no_grad():
            model(tokens)

    calls = {
        "once": lambda: projected_call(model, path, loader, loader),
        "forward": forward,
        "forward_backward": train_step,
    }
    if twice:
        calls["twice"] = lambda: projected_call(model, path, loader, list(loader))
    if repeats > 1:
        calls["once"]()  # warm-up
    runs = {name: [] for name in calls}
    results = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            results[name], c = meter(fn)
            runs[name].append(c)
            log(f"{name}: {c['s']:.1f} s")
    out = {
        name: {
            "s": statistics.median(c["s"] for c in cs),
            "peak": max(c["peak"] for c in cs),
            "before": min(c["before"] for c in cs),
        }
        for name, cs in runs.items()
    }
    once = out["once_outputs"] = results["once"]
    out["seed0_vs_public"] = relative_error(acc["first_seed_sdi"], once.sdi)
    out["error_public"] = {
        "sdi": relative_error(once.sdi, acc["exact"].sdi),
        "tracin": relative_error(once.tracin, acc["exact"].tracin),
    }
    if twice:
        out["bitwise"] = _bitwise(once, results["twice"])
    return out


def _bitwise(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("sdi", "tracin"))


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(
            line.split(":", 1) for line in lscpu.splitlines() if ":" in line and line.strip()
        )
        cpu = f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}{gpu}; torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"sdi from {Path(sdi.__file__).parent}, "
        f"load average before the run {os.getloadavg()[0]:.1f}"
    )


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def report(args, config, main: dict, costs: dict | None, choices: list, small_costs, also) -> str:
    lines = [
        "# The paper's headline figures at its own scale",
        "",
        f"Command: `{args.command}`  ",
        f"Date: {args.date} (UTC)  ",
        f"Machine: {args.machine}  ",
        f"Device: {args.device}; run took {time.perf_counter() - args.start:.0f} s so far"
        + ("" if args.finished else " (**unfinished: stages below are those done**)"),
        "",
        f"Model (`bench/paper/model.py`): {config.describe()}; {main['params'] / 1e6:.2f}M "
        f"parameters (paper: 135.1M), looped body {main['body'] / 1e6:.2f}M in "
        f"{main['body_tensors']} tensors; {N_SEQ} random sequences as both train and query set, one "
        f"checkpoint, `ProjectedTracInSDI(projection_size={M})` on `model.recurrent`.",
        "",
        "Choices the paper leaves open (`model.py`; the defaults are the first of each): "
        "positions `learned` absolute (GPT-2) or `none`; the loop's start state `prelude` (the "
        "prelude's output), `zeros` or `noise` (a fixed N(0, 1) draw); the injection adapter "
        "`concat`, `Linear(2d -> d)(concat(state, prelude_out))`, or `add`, "
        "`state + Linear(d -> d)(prelude_out)`.",
        "",
        "## Accuracy against the exact oracle",
        "",
        "Relative error `||est - exact||_F / ||exact||_F` over every entry of the SDI tensor "
        f"`(4, 4, {config.loop_steps})` and of the TracIn matrix `(4, 4)` (self-pairs included), "
        f"mean ± sample std over {len(args.seed_list)} sketch seeds "
        f"({', '.join(map(str, args.seed_list))}).",
        "",
        "| | SDI | TracIn |",
        "|---|---:|---:|",
    ]
    sdi, tr = mean_std(main["errors"]["sdi"]), mean_std(main["errors"]["tracin"])
    lines += [
        f"| this run | {sdi[0]:.4f} ± {sdi[1]:.4f} | {tr[0]:.4f} ± {tr[1]:.4f} |",
        f"| paper (A6000) | {PAPER['sdi'][0]:.4f} ± {PAPER['sdi'][1]:.4f} | "
        f"{PAPER['tracin'][0]:.4f} ± {PAPER['tracin'][1]:.4f} |",
        "",
        "Per seed (SDI / TracIn): "
        + ", ".join(
            f"{a:.4f} / {b:.4f}"
            for a, b in zip(main["errors"]["sdi"], main["errors"]["tracin"], strict=True)
        ),
        "",
        f"Oracle (`bench/paper/oracle.py`): {main['oracle_cost']['s']:.0f} s, peak "
        f"{mb(main['oracle_cost']['peak'])}; its per-step gradients summed over steps equal plain "
        f"per-example autograd to {main['exact'].consistency:.1e} (relative). The seeds share one "
        f"forward and backward (`bench/paper/seeds.py`): {main['seeds_cost']['s']:.0f} s for "
        f"{len(args.seed_list)} seeds.",
    ]
    if costs is not None:
        fb = costs["forward_backward"]["s"]
        lines += [
            f"Seed {args.seed_list[0]} from the shared featurisation vs the public call: SDI relative "
            f"difference {costs['seed0_vs_public']:.1e}; the public call's errors "
            f"{costs['error_public']['sdi']:.4f} / {costs['error_public']['tracin']:.4f}.",
            "",
            "## Cost of one call at this scale",
            "",
            "| | time (s) | / plain forward + backward | peak memory (process) | added over the "
            "memory before |",
            "|---|---:|---:|---:|---:|",
        ]
        rows = [
            ("plain forward (no grad)", costs["forward"]),
            ("plain forward + backward (parameter grads)", costs["forward_backward"]),
            ("projected SDI call, self-influence (featurised once)", costs["once"]),
        ]
        if "twice" in costs:
            rows.append(("projected SDI call, set passed twice (featurised twice)", costs["twice"]))
        for name, c in rows:
            lines.append(
                f"| {name} | {c['s']:.1f} | {c['s'] / fb:.2f} | {mb(c['peak'])} | "
                f"{mb(c['peak'] - c['before'])} |"
            )
        if "twice" in costs:
            lines.append(
                f"\nFeaturising once saves {costs['twice']['s'] - costs['once']['s']:.0f} s "
                f"({costs['twice']['s'] / costs['once']['s']:.2f}x); outputs bitwise equal: "
                f"{costs['bitwise']}."
            )
        lines.append(
            "\nThe reference `step-decomposed-influence` 0.1.1: not run (no `bench/.venv-reference`"
            " on this machine)."
        )
    if choices:
        scale = args.choices_scale
        lines += [
            "",
            f"## The choices the paper leaves open (at `--choices-scale {scale}`: "
            f"{SCALES[scale].describe()})",
            "",
            "Each row changes one choice from the defaults (first row); its own model, oracle and "
            f"{len(args.seed_list)} seeds. The SDI error's change is against the defaults' row.",
            "",
            "| choice | SDI error | TracIn error | SDI change |",
            "|---|---:|---:|---:|",
        ]
        base = mean_std(choices[0][1]["sdi"])[0]
        for name, errors in choices:
            s, t = mean_std(errors["sdi"]), mean_std(errors["tracin"])
            lines.append(
                f"| {name} | {s[0]:.4f} ± {s[1]:.4f} | {t[0]:.4f} ± {t[1]:.4f} | "
                f"{s[0] / base - 1:+.0%} |"
            )
    if also:
        base = mean_std(main["errors"]["sdi"])[0]
        lines += [
            "",
            f"## Open choices at `--scale {args.scale}` (`--also`)",
            "",
            "The same run's model with one choice changed: its own oracle and seeds.",
            "",
            "| choice | SDI error | TracIn error | SDI change |",
            "|---|---:|---:|---:|",
            f"| {config.describe().split('seq_len=')[1].split(', ', 1)[1]} (above) | "
            f"{base:.4f} ± {mean_std(main['errors']['sdi'])[1]:.4f} | "
            f"{mean_std(main['errors']['tracin'])[0]:.4f} ± "
            f"{mean_std(main['errors']['tracin'])[1]:.4f} | +0% |",
        ]
        for name, errors in also:
            s, t = mean_std(errors["sdi"]), mean_std(errors["tracin"])
            lines.append(
                f"| {name} | {s[0]:.4f} ± {s[1]:.4f} | {t[0]:.4f} ± {t[1]:.4f} | "
                f"{s[0] / base - 1:+.0%} |"
            )
    if small_costs is not None:
        c = small_costs
        lines += [
            "",
            f"At `--choices-scale {args.choices_scale}` (defaults; after a warm-up call, median of "
            "3 rounds of the calls in turn): self-influence call "
            f"{c['once']['s']:.1f} s, featurised twice {c['twice']['s']:.1f} s "
            f"({c['twice']['s'] / c['once']['s']:.2f}x), plain forward + backward "
            f"{c['forward_backward']['s']:.1f} s; outputs bitwise equal: {c['bitwise']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", choices=list(SCALES), default="paper")
    parser.add_argument("--choices-scale", choices=[*SCALES, "none"], default="reduced")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--skip-twice", action="store_true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CHOICE=VALUE",
        help="change an open choice of the --scale model (e.g. loop_start=zeros); repeatable",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="CHOICE=VALUE",
        help="after everything else, the errors of the --scale model with this choice changed",
    )
    parser.add_argument(
        "--accuracy-only", action="store_true", help="stop after the errors (no cost, no choices)"
    )
    parser.add_argument("--out", type=Path, default=HERE.parent / "results" / "paper.md")
    parser.add_argument("--command", default="python " + " ".join(sys.argv))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.seed_list = list(range(args.seeds))
    args.date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    args.machine, args.start, args.finished = machine(), time.perf_counter(), False
    device = torch.device(args.device)
    changes = dict(item.split("=", 1) for item in args.set)
    also = [dict([item.split("=", 1)]) for item in args.also]
    for change in [changes, *also]:
        for name, value in change.items():
            if value not in CHOICES.get(name, ()):
                parser.error(f"{name}={value} is not an open choice: {CHOICES}")
    config = dataclasses.replace(SCALES[args.scale], **changes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {"costs": None, "choices": [], "small_costs": None, "also": []}

    def write():
        args.out.write_text(report(args, config, main_acc, **state))
        log(f"wrote {args.out}")

    log(f"accuracy at --scale {args.scale}: {config.describe()}")
    main_acc = accuracy(config, device, args.seed_list)
    write()
    if args.accuracy_only:
        args.finished = True
        write()
        return
    with tempfile.TemporaryDirectory() as tmp:
        state["costs"] = cost(main_acc, device, Path(tmp), twice=False)
        write()
        if args.choices_scale != "none":
            small = SCALES[args.choices_scale]
            variants = [("defaults", {})] + [
                (f"{name}={value}", {name: value})
                for name, allowed in CHOICES.items()
                for value in allowed[1:]
            ]
            for name, change in variants:
                log(f"choice {name} at --choices-scale {args.choices_scale}")
                acc = accuracy(dataclasses.replace(small, **change), device, args.seed_list)
                state["choices"].append((name, acc["errors"]))
                if name == "defaults":
                    state["small_costs"] = cost(acc, device, Path(tmp), twice=True, repeats=3)
                write()
        if not args.skip_twice:
            log("the paper-scale call with the set featurised twice")
            once = state["costs"]["once_outputs"]
            state["costs"] = {**state["costs"], **_twice(main_acc, device, Path(tmp), once)}
            write()
    for change in also:
        name = ", ".join(f"{k}={v}" for k, v in change.items())
        log(f"accuracy at --scale {args.scale} with {name}")
        acc = accuracy(dataclasses.replace(config, **change), device, args.seed_list)
        state["also"].append((name, acc["errors"]))
        del acc
        write()
    args.finished = True
    write()


def _twice(acc: dict, device, tmp: Path, once) -> dict:
    """The public call with the set passed as two loaders (featurised twice), its outputs checked
    bitwise against ``once``, the call that featurised it once."""
    path = tmp / "twice.pt"  # this model's own file: another scale's cost() wrote checkpoint.pt
    torch.save({"model_state_dict": acc["model"].state_dict()}, path)
    loader = [{"tokens": acc["tokens"]}]
    two, twice = Meter(device)(lambda: projected_call(acc["model"], path, loader, list(loader)))
    log(f"projected call (featurised twice): {twice['s']:.0f} s")
    return {"twice": twice, "bitwise": _bitwise(once, two)}


if __name__ == "__main__":
    main()
