"""Write ``bench/results/cpu-latest.md`` from one ``make bench`` run.

Reads the pytest-benchmark JSON of ``bench/test_*.py`` and the JSON of ``bench/reference/compare_reference.py``
and writes a markdown page: the machine (CPU model, cores, threads, torch version, date, load), the
command, and tables of medians and ratios against the DESIGN §5 targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import memory as mem
import torch

TARGET_VS_TRAIN_STEP = 1.25  # projected TracIn time <= 1.25x a plain forward + backward
TARGET_VS_REFERENCE = 2.5  # >= 2.5x faster than step-decomposed-influence 0.1.1
MEMORY_SLACK_MIB = 1.0  # memory may grow with N_train by the output tensor, plus this much noise


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def end_to_end(benchmarks: list[dict]) -> list[str]:
    rows = [b for b in benchmarks if b["group"] == "end to end"]
    if not rows:
        return []
    lines = [
        "## End to end vs a plain training step (paired rounds)",
        "",
        "| what | median s | ratio to train step (median of pairs) | per-pair ratios | target |",
        "|---|---:|---:|---|---|",
    ]
    for b in rows:
        info = b["extra_info"]
        if "ratio_median" in info:
            ratio = info["ratio_median"]
            pairs = ", ".join(f"{r:.2f}" for r in info["ratios"])
            target = f"<= {TARGET_VS_TRAIN_STEP}: {verdict(ratio <= TARGET_VS_TRAIN_STEP)}"
            if "tracin" not in info["what"]:
                target = "-"
            lines.append(
                f"| {info['what']} | {b['stats']['median']:.3f} | {ratio:.2f} | {pairs} | {target} |"
            )
        else:
            lines.append(f"| {info['what']} | {b['stats']['median']:.3f} | 1 | - | - |")
    return [*lines, ""]


def reference(results: dict) -> list[str]:
    lines = [
        "## vs step-decomposed-influence 0.1.1 (alternating processes, reference then ours)",
        "",
        "| mode | reference s | ours s | speed-up (median of pairs) | per-pair | CPU-time speed-up"
        " | first-call speed-up | fastest-call speed-up | max rel. diff of outputs"
        " | target >= 2.5x |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for mode, res in results.items():
        med = res["median"]
        pairs = ", ".join(f"{p['speedup']:.2f}" for p in res["pairs"])
        ok = verdict(med["speedup"] >= TARGET_VS_REFERENCE)
        lines.append(
            f"| {mode} | {med['reference_s']:.2f} | {med['ours_s']:.2f} | {med['speedup']:.2f}x"
            f" | {pairs} | {med['cpu_speedup']:.2f}x | {med['first_call_speedup']:.2f}x"
            f" | {med['fastest_call_speedup']:.2f}x | {med['max_rel_diff']:.1e} | {ok} |"
        )
    lines += [
        "",
        "Each process times one warm-up call, then `--repeats` calls; *speed-up* compares the"
        " medians of those repeats and is the one held to the target. *First-call* compares the"
        " warm-up calls (a fresh process's cold call, as a script calling the estimator once"
        " sees it), *fastest-call* each process's fastest repeat. 0.1.1's time varies within a"
        " process with its minor page faults (one 3.2 s call took 0.9 million, a 1.8 s call of the"
        " same process none), so these views can differ.",
    ]
    return [*lines, ""]


def hf_row(path: Path | None, command: str) -> list[str]:
    """The HF-model row of ``bench/reference/hf_compare.py`` (ALBERT vs 0.1.1 vs a plain step), if run."""
    if path is None:
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))  # its own folder
    import hf_compare

    return hf_compare.markdown(json.loads(path.read_text()), command)


def memory(benchmarks: list[dict]) -> list[str]:
    rows = sorted(
        (b for b in benchmarks if b["group"] == "memory vs N_train"),
        key=lambda b: b["extra_info"]["n_train"],
    )
    if not rows:
        return []
    mib = float(1 << 20)
    lines = [
        '## Memory vs N_train (streaming `influence_across_checkpoints`, mode="sdi")',
        "",
        f"`bench/speed/memory.py --child N` in a fresh process: toy looped transformer (d {mem.D},"
        f" tau {mem.STEPS}, seq {mem.SEQ}, m {mem.M}, {mem.N_QUERY} queries). Growth over the"
        " footprint before the call; the reference design keeps every train example's per-step"
        " sketches (N_train x params x steps x m x 4 bytes). *seconds*: the whole process.",
        "",
        "| N_train | heap in use, MiB | peak RSS, MiB | output tensor, MiB"
        " | reference design's train sketches, MiB | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b in rows:
        info = b["extra_info"]
        lines.append(
            f"| {info['n_train']} | {info['heap_growth_bytes'] / mib:.2f}"
            f" | {info['rss_growth_bytes'] / mib:.1f} | {info['output_bytes'] / mib:.2f}"
            f" | {info['reference_design_bytes'] / mib:.0f} | {b['stats']['median']:.1f} |"
        )
    small, large = rows[0]["extra_info"], rows[-1]["extra_info"]
    heap = (large["heap_growth_bytes"] - small["heap_growth_bytes"]) / mib
    output = (large["output_bytes"] - small["output_bytes"]) / mib
    lines += [
        "",
        f"From N_train {small['n_train']} to {large['n_train']} the heap in use grows by"
        f" {heap:.2f} MiB and the output tensor by {output:.2f} MiB: {heap - output:+.2f} MiB"
        f" beyond the output (target: the output only, within {MEMORY_SLACK_MIB} MiB of"
        f" allocator noise): {verdict(heap - output <= MEMORY_SLACK_MIB)}. Peak RSS also counts"
        " allocator fragmentation and each batch's temporaries.",
        "",
    ]
    return lines


def rule_cost(benchmarks: list[dict]) -> list[str]:
    """The generic rule beside the path featurisation takes for the same module
    (``test_rule_cost.py``: its operations' rules, or its module-level rule)."""
    by_module: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    for b in benchmarks:
        info = b["extra_info"]
        if info.get("op") == "rule":
            by_module.setdefault(info["shape"], {})[info["path"]] = b["stats"]["median"]
            if info["path"] == "specific":
                names[info["shape"]] = info["rule"]
    if not by_module:
        return []
    lines = [
        "## Generic rule vs the path featurisation takes (one use, B=32, T=64, m=1024)",
        "",
        "| module | path featurisation takes | its ms | generic rule ms | generic / its |",
        "|---|---|---:|---:|---:|",
    ]
    for module, t in by_module.items():
        if {"specific", "generic"} <= t.keys():
            lines.append(
                f"| {module} | {names.get(module, '?')} | {t['specific'] * 1e3:.2f}"
                f" | {t['generic'] * 1e3:.2f} | {t['generic'] / t['specific']:.2f} |"
            )
    return [*lines, ""]


def capture_cost(benchmarks: list[dict]) -> list[str]:
    """Issue 18's speed rows (``test_capture_cost.py``): each against its partner, paired rounds."""
    rows = [b for b in benchmarks if b["extra_info"].get("op") == "capture"]
    if not rows:
        return []
    lines = [
        "## Capture at the operation: looped GPTs (paired rounds)",
        "",
        "`bench/speed/test_capture_cost.py`: a looped GPT block (`tests/capture_models.py`),"
        ' projected `mode="tracin"`, each round after a timed round of its partner.',
        "",
        "| what | median s | partner | partner median s | ratio (median of pairs) | per-pair"
        " | fastest / fastest | target |",
        "|---|---:|---|---:|---:|---|---:|---|",
    ]
    for b in rows:
        info = b["extra_info"]
        ratio, target = info["ratio_median"], info["target"]
        pairs = ", ".join(f"{r:.2f}" for r in info["ratios"])
        partner_s = sorted(info["partner_s"])[len(info["partner_s"]) // 2]
        lines.append(
            f"| {info['what']} | {b['stats']['median']:.3f} | {info['partner']} | {partner_s:.3f}"
            f" | {ratio:.2f} | {pairs} | {info.get('ratio_of_fastest', float('nan')):.2f}"
            f" | <= {target}: {verdict(ratio <= target)} |"
        )
    return [*lines, ""]


def sketch_ops(benchmarks: list[dict]) -> list[str]:
    rows = [b for b in benchmarks if b["extra_info"].get("op") not in (None, "rule", "capture")]
    if not rows:
        return []
    fastest: dict[tuple, tuple[float, str]] = {}
    for b in rows:
        info = b["extra_info"]
        key = (info["op"], info["shape"], info["backend"])
        if key not in fastest or b["stats"]["median"] < fastest[key][0]:
            fastest[key] = (b["stats"]["median"], info["path"])
    lines = [
        "## Sketch ops, one call",
        "",
        "`explicit`: materialised gradient + cached 2-D hash; `fft`: count sketches + FFT;"
        " *model picks*: the cost model's choice in `sdi.rules.SketchRules`.",
        "",
        "| op | shape | backend | path | median ms | model picks | pick is the faster |",
        "|---|---|---|---|---:|---|---|",
    ]
    for b in rows:
        info = b["extra_info"]
        pick = info.get("model_picks", "-")
        right = "-"
        if pick != "-":
            right = verdict(pick == fastest[(info["op"], info["shape"], info["backend"])][1])
        lines.append(
            f"| {info['op']} | {info['shape']} | {info['backend']} | {info['path']}"
            f" | {b['stats']['median'] * 1e3:.2f} | {pick} | {right} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, required=True, help="pytest-benchmark JSON")
    parser.add_argument("--reference", type=Path, required=True, help="compare_reference JSON")
    parser.add_argument("--hf", type=Path, default=None, help="hf_compare JSON (the HF-model row)")
    parser.add_argument("--command", required=True, help="the command that produced them")
    parser.add_argument("--load-before", default="?", help="load average when the run started")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    benchmarks = json.loads(args.benchmarks.read_text())["benchmarks"]
    threads = os.environ.get("OMP_NUM_THREADS") or f"{torch.get_num_threads()} (torch default)"
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# CPU benchmarks (latest run)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}, torch"
        f" {torch.__version__}, {datetime.date.today().isoformat()}. Load average (1, 5, 15 min)"
        f" before: {args.load_before}; after: {load_after} -- a shared machine: read the ratios,"
        " each from runs side by side, not the absolute times.",
        "",
        f"Command: `{args.command}`",
        "",
        "Workload (DESIGN §5): looped transformer d_model 128, 4 heads, 8 loop steps, seq 64,"
        " batch 32, 128 train + 32 query examples, projection_size 1024, target_modules ="
        " model.core, one checkpoint.",
        "",
        *end_to_end(benchmarks),
        *capture_cost(benchmarks),
        *reference(json.loads(args.reference.read_text())),
        *hf_row(args.hf, args.command),
        *sketch_ops(benchmarks),
        *rule_cost(benchmarks),
        *memory(benchmarks),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
