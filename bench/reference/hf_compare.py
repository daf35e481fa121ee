"""The HF-model row: this package vs ``step-decomposed-influence`` 0.1.1 vs a plain forward +
backward, on ``bench/reference/hf_workload.py`` (ALBERT, one shared layer group used 8 times), in one run.

Per pair and mode, two fresh processes one after the other: the reference, then ours, each timing
``--repeats`` calls after a warm-up. Ours follows each call with a plain forward + backward with
parameter gradients over the same batches at each checkpoint (the training-step cost of the same
examples), in the same process, so that their ratio is not moved by the machine's changing load.
The outputs of the reference and ours must agree (same seed -> same hash tables on the CPU).
Reports per-pair ratios and their medians: reference / ours (target >= 5x) and ours / plain step
(target <= 1.1x); ``--json`` for ``bench/speed/report.py``, ``--md`` a page of its own.

The reference runs in ``bench/.venv-reference`` (made by ``bench/reference/compare_reference.py`` on first
use, with the same torch spec); this script adds the ``transformers`` version installed here to it
when missing. ``--reference-python`` / ``$SDI_REFERENCE_PYTHON`` names another interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import compare_reference as ref_tools
import torch

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent  # bench/: the reference venv
ROOT = BENCH.parent
TARGET_VS_REFERENCE = 5.0
TARGET_VS_TRAIN_STEP = 1.1


def with_transformers(python: Path) -> Path:
    """Install this interpreter's ``transformers`` version into the reference venv if needed."""
    import transformers

    want = transformers.__version__
    check = [str(python), "-c", "import transformers; print(transformers.__version__)"]
    found = subprocess.run(check, capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() != want:
        print(f"installing transformers=={want} into the reference venv", flush=True)
        pip = [str(python), "-m", "pip", "install", "-q", f"transformers=={want}"]
        subprocess.run(pip, check=True)
    return python


def run(python: Path, out: Path, *, ours: bool, mode: str, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(python), str(HERE / "hf_workload.py"), "--mode", mode, "--repeats", str(repeats)]
    if ours:
        env["PYTHONPATH"] = str(ROOT)
        cmd.append("--with-train-step")
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env)
    return torch.load(out, weights_only=False)


def compare(
    ref_python: Path, mode: str, pairs: int, repeats: int, ref_repeats: int, rtol: float
) -> dict:
    rows = []
    ours_python = Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            ref = run(ref_python, Path(tmp) / "ref.pt", ours=False, mode=mode, repeats=ref_repeats)
            ours = run(ours_python, Path(tmp) / "ours.pt", ours=True, mode=mode, repeats=repeats)
            if Path(ref["package"]).resolve().parent == (ROOT / "sdi").resolve():
                raise RuntimeError(f"the reference run imported this repository: {ref['package']}")
            diff = ref_tools.check_agreement(ref, ours, mode, rtol)
            row = {
                "reference_s": statistics.median(ref["seconds"]),
                "ours_s": statistics.median(ours["seconds"]),
                "train_step_s": statistics.median(ours["train_step_seconds"]),
                "reference_cpu_s": statistics.median(ref["cpu_seconds"]),
                "ours_cpu_s": statistics.median(ours["cpu_seconds"]),
                "train_step_cpu_s": statistics.median(ours["train_step_cpu_seconds"]),
                "reference_first_s": ref["first_seconds"],
                "ours_first_s": ours["first_seconds"],
                "max_rel_diff": diff,
            }
            row["speedup"] = row["reference_s"] / row["ours_s"]
            row["vs_train_step"] = row["ours_s"] / row["train_step_s"]
            row["reference_vs_train_step"] = row["reference_s"] / row["train_step_s"]
            row["cpu_speedup"] = row["reference_cpu_s"] / row["ours_cpu_s"]
            row["cpu_vs_train_step"] = row["ours_cpu_s"] / row["train_step_cpu_s"]
            rows.append(row)
            print(
                f"hf {mode} pair {i + 1}/{pairs}: reference {row['reference_s']:.2f} s, ours "
                f"{row['ours_s']:.2f} s, plain step {row['train_step_s']:.2f} s: speed-up "
                f"{row['speedup']:.2f}x, ours / step {row['vs_train_step']:.2f} (CPU time: "
                f"{row['cpu_speedup']:.2f}x, {row['cpu_vs_train_step']:.2f}), "
                f"max rel. diff {diff:.1e}",
                flush=True,
            )
    keys = [k for k in rows[0] if k != "max_rel_diff"]
    summary = {k: statistics.median(r[k] for r in rows) for k in keys}
    summary["max_rel_diff"] = max(r["max_rel_diff"] for r in rows)
    return {"pairs": rows, "median": summary}


def markdown(results: dict, command: str) -> list[str]:
    """The table of ``results`` (as ``--json`` writes them); ``bench/speed/report.py`` reuses it."""
    import hf_workload as w

    verdict = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines = [
        "## HF model: ALBERT (transformers) vs step-decomposed-influence 0.1.1 vs a plain step",
        "",
        f"`AlbertForMaskedLM` from a config (random weights): hidden {w.HIDDEN}, {w.HEADS} heads,"
        f" {w.LAYERS} layers sharing one layer group (`target_modules` = that group, used"
        f" {w.LAYERS} times), seq {w.SEQ}, batch {w.BATCH}, {w.N_TRAIN} train + {w.N_QUERY}"
        f" query, {len(w.WEIGHTS)} checkpoints, m={w.M}. *Plain step*: forward + backward with"
        " parameter gradients over the same batches at each checkpoint, timed after each of our calls"
        " in the same process. Per pair, two fresh processes (reference, then ours), each the"
        f" median of its repeats after a warm-up. Command: `{command}`.",
        "",
        "| mode | 0.1.1 s | ours s | plain step s | 0.1.1 / ours (per pair) | target >= 5x"
        " | ours / plain step (per pair) | target <= 1.1x | CPU time: 0.1.1 / ours"
        " | CPU time: ours / plain step | first-call 0.1.1 / ours | max rel. diff of outputs |",
        "|---|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for mode, res in results.items():
        med = res["median"]
        speedups = ", ".join(f"{p['speedup']:.2f}" for p in res["pairs"])
        ratios = ", ".join(f"{p['vs_train_step']:.2f}" for p in res["pairs"])
        first = med["reference_first_s"] / med["ours_first_s"]
        lines.append(
            f"| {mode} | {med['reference_s']:.2f} | {med['ours_s']:.2f} | {med['train_step_s']:.2f}"
            f" | {med['speedup']:.2f}x ({speedups})"
            f" | {verdict(med['speedup'] >= TARGET_VS_REFERENCE)}"
            f" | {med['vs_train_step']:.2f} ({ratios})"
            f" | {verdict(med['vs_train_step'] <= TARGET_VS_TRAIN_STEP)}"
            f" | {med['cpu_speedup']:.2f}x | {med['cpu_vs_train_step']:.2f}"
            f" | {first:.2f}x | {med['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        "The targets are held to the wall-clock medians. *CPU time* (user + system of the"
        " process, one torch thread) is also shown: on a shared machine it moves less with the"
        " other processes' load than wall time does.",
    ]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of ours per process")
    parser.add_argument(
        "--reference-repeats", type=int, default=1, help="timed calls of 0.1.1 (~10x slower)"
    )
    parser.add_argument("--modes", nargs="+", default=["sdi", "tracin"])
    parser.add_argument(
        "--reference-python", type=Path, default=os.environ.get("SDI_REFERENCE_PYTHON") or None
    )
    parser.add_argument("--venv", type=Path, default=BENCH / ".venv-reference")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--command", default="python bench/reference/hf_compare.py")
    args = parser.parse_args()

    python = ref_tools.reference_python(args.reference_python, args.venv, args.torch_spec)
    python = with_transformers(python)
    results = {
        m: compare(python, m, args.pairs, args.repeats, args.reference_repeats, args.rtol)
        for m in args.modes
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.md is not None:
        import transformers

        threads = os.environ.get("OMP_NUM_THREADS") or f"{torch.get_num_threads()} (default)"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        head = [
            "# HF-model CPU benchmark (latest run)",
            "",
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {threads}, torch"
            f" {torch.__version__}, transformers {transformers.__version__},"
            f" {datetime.date.today().isoformat()}; load average after: {load} (a shared"
            " machine: read the ratios of processes run side by side, not the absolute times).",
            "",
        ]
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join([*head, *markdown(results, args.command)]))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
