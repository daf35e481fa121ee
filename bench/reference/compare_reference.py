"""This package against ``step-decomposed-influence`` 0.1.1 on the same machine, in one run.

Runs ``bench/speed/workload.py`` (the DESIGN §5 CPU workload) under both packages, alternating
reference, ours, reference, ours, ... (``--pairs`` pairs per mode), each run in a fresh process
that times ``--repeats`` calls after a warm-up. Both packages draw the same hash tables from the
same seed on the CPU, so their outputs must agree to float rounding; that is checked first. Prints
the per-pair speed-up (reference time / our time, medians within each process) and its median, for
``mode="sdi"`` and ``mode="tracin"``, and with ``--json`` writes them for ``bench/speed/report.py``, with
two more views of each pair: the speed-up of the first (cold) call of each process, and of each
process's fastest call.

The reference lives in its own virtual environment (both packages are imported as ``sdi``):
``bench/.venv-reference``, created on first use with ``torch==2.13.0`` (``--torch-spec``) and
``step-decomposed-influence==0.1.1`` from PyPI (``bench/accuracy/accuracy.py`` shares it), or any
interpreter given as ``--reference-python`` or ``$SDI_REFERENCE_PYTHON``.
Our side runs under this interpreter with the repository first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]  # bench/: the reference venv
ROOT = BENCH.parent
WORKLOAD = BENCH / "speed" / "workload.py"
REFERENCE = "step-decomposed-influence==0.1.1"


def reference_python(path: Path | None, venv_dir: Path, torch_spec: str) -> Path:
    """The reference interpreter: ``path``, or the one in ``venv_dir`` (created if missing)."""
    if path is not None:
        return path
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / ".installed"
    if not stamp.exists() or stamp.read_text() != f"{torch_spec} {REFERENCE}":
        print(f"creating {venv_dir} with {torch_spec} and {REFERENCE}", flush=True)
        venv.create(venv_dir, with_pip=True, clear=True)
        for spec in (torch_spec, REFERENCE):  # torch first, so the reference keeps that build
            subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
        stamp.write_text(f"{torch_spec} {REFERENCE}")
    return python


def run_workload(python: Path, mode: str, repeats: int, out: Path, ours: bool) -> dict:
    """One fresh process of ``bench/speed/workload.py``; returns what it saved."""
    # The script's folder (bench/speed/, no `sdi` in it) is the only path Python adds; PYTHONPATH is
    # cleared for the reference and points at this repository for ours.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(ROOT)
    cmd = [str(python), str(WORKLOAD), "--mode", mode, "--repeats", str(repeats)]
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env)
    return torch.load(out, weights_only=False)


def check_agreement(ref: dict, ours: dict, mode: str, rtol: float) -> float:
    """Largest difference of the outputs relative to the largest reference value; raises past ``rtol``."""
    worst = 0.0
    for key in ("tracin", "sdi"):
        if ref[key] is None and ours[key] is None:
            continue
        want, got = ref[key].double(), ours[key].double()
        if want.shape != got.shape:
            raise AssertionError(
                f"{mode}: {key} shapes differ: {tuple(want.shape)} vs {tuple(got.shape)}"
            )
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    if worst > rtol:
        raise AssertionError(
            f"{mode}: outputs differ by {worst:.2e} (relative), more than {rtol:.0e}"
        )
    return worst


def compare(ref_python: Path, mode: str, pairs: int, repeats: int, rtol: float) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            ref = run_workload(ref_python, mode, repeats, Path(tmp) / f"ref{i}.pt", ours=False)
            ours = run_workload(
                Path(sys.executable), mode, repeats, Path(tmp) / f"ours{i}.pt", ours=True
            )
            ours_pkg = (ROOT / "sdi").resolve()
            if Path(ref["package"]).resolve().parent == ours_pkg:
                raise RuntimeError(
                    f"the reference run imported this repository's sdi: {ref['package']}"
                )
            if Path(ours["package"]).resolve().parent != ours_pkg:
                raise RuntimeError(f"our run imported another sdi: {ours['package']}")
            diff = check_agreement(ref, ours, mode, rtol)
            row = {
                "reference_s": statistics.median(ref["seconds"]),
                "ours_s": statistics.median(ours["seconds"]),
                "reference_cpu_s": statistics.median(ref["cpu_seconds"]),
                "ours_cpu_s": statistics.median(ours["cpu_seconds"]),
                "max_rel_diff": diff,
            }
            row["speedup"] = row["reference_s"] / row["ours_s"]
            row["cpu_speedup"] = row["reference_cpu_s"] / row["ours_cpu_s"]
            # Two views besides the median: each process's first (cold) call, and its fastest call.
            row["first_call_speedup"] = ref["first_seconds"] / ours["first_seconds"]
            row["fastest_call_speedup"] = min(ref["seconds"]) / min(ours["seconds"])
            rows.append(row)
            print(
                f"{mode} pair {i + 1}/{pairs}: reference {row['reference_s']:.2f} s, "
                f"ours {row['ours_s']:.2f} s, speed-up {row['speedup']:.2f}x "
                f"(CPU time {row['cpu_speedup']:.2f}x), max rel. diff {diff:.1e}",
                flush=True,
            )
    summary = {
        key: statistics.median(r[key] for r in rows)
        for key in (
            "reference_s",
            "ours_s",
            "speedup",
            "cpu_speedup",
            "first_call_speedup",
            "fastest_call_speedup",
        )
    }
    summary["max_rel_diff"] = max(r["max_rel_diff"] for r in rows)
    per_pair = ", ".join(f"{r['speedup']:.2f}" for r in rows)
    print(
        f"{mode}: median speed-up {summary['speedup']:.2f}x over {pairs} pairs (per pair: {per_pair})",
        flush=True,
    )
    return {"pairs": rows, "median": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="reference/ours pairs per mode")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    parser.add_argument("--modes", nargs="+", default=["sdi", "tracin"])
    parser.add_argument(
        "--reference-python",
        type=Path,
        default=os.environ.get("SDI_REFERENCE_PYTHON") or None,
        help="interpreter of a venv with step-decomposed-influence 0.1.1 ($SDI_REFERENCE_PYTHON)",
    )
    parser.add_argument("--venv", type=Path, default=BENCH / ".venv-reference")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    parser.add_argument("--rtol", type=float, default=1e-4, help="allowed output difference")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    ref_python = reference_python(args.reference_python, args.venv, args.torch_spec)
    results = {m: compare(ref_python, m, args.pairs, args.repeats, args.rtol) for m in args.modes}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
