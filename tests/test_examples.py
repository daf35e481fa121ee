"""The examples run end to end as a user runs them (small settings, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_hf_looped_lm_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "examples" / "hf_looped_lm_sdi.py"
    args = ["--out", str(tmp_path), "--train-steps", "20", "--projection-size", "1024"]
    run = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    folders = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert folders == ["checkpoint-10", "checkpoint-20"]
    for folder in folders:
        files = {p.name for p in (tmp_path / folder).iterdir()}
        assert {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.json"} <= files
        assert f"{folder}: eta = " in run.stdout
    # Each folder's weight came from its trainer state, at its own step.
    assert run.stdout.count("from trainer_state.json (learning_rate logged at step") == 2
    error = float(re.search(r"relative error: ([0-9.]+)", run.stdout).group(1))
    assert error < 0.25, run.stdout  # m=1024 on a 4-step ALBERT loop: a few percent
    assert len(re.findall(r"train +\d+: TracIn", run.stdout)) == 3
    assert (tmp_path / "step_influence.png").stat().st_size > 1000
