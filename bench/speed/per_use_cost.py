"""The capture's Python per use, on a tiny copy of the capture-cost workload.

``bench/speed/test_capture_cost.py``'s casted GPT with per-block vectors, shrunk to d 8, seq 4: every
operation is nearly free, so what is timed is the capture's own Python. Prints, per operation, the
time per use inside the forward's ``CaptureMode._use`` and the backward's ``OpRules._features``,
the time per use of ``_Pass.use_grad`` (every rule with its checks), and the median featurisation
and training step. Compare two trees by running it in each, alternated::

    PYTHONPATH=TREE python bench/speed/per_use_cost.py --calls 20
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "tests")]

import test_capture_cost as workload  # noqa: E402

from sdi import capture, featurize  # noqa: E402
from sdi.rules import ops  # noqa: E402

TIMES: collections.Counter = collections.Counter()
COUNTS: collections.Counter = collections.Counter()


def _timed(owner, name: str, label) -> None:
    """Wrap ``owner.name`` to add its time under ``label(*args)``."""
    real = getattr(owner, name)

    def wrapper(self, *args):
        start = time.perf_counter()
        out = real(self, *args)
        key = label(*args)
        TIMES[key] += time.perf_counter() - start
        COUNTS[key] += 1
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="featurisations timed")
    calls = parser.parse_args().calls
    workload.VOCAB, workload.D, workload.HEADS, workload.FF, workload.SEQ = 32, 8, 2, 16, 4
    _timed(
        ops.OpRules, "_features", lambda use, g: f"backward {getattr(use.func, '__name__', '?')}"
    )
    _timed(
        capture.CaptureMode, "_use", lambda func, *_: f"forward {getattr(func, '__name__', '?')}"
    )
    _timed(featurize._Pass, "use_grad", lambda *_: "use_grad (all rules)")
    w = workload.Workload(workload._gpt(casted=True, vectors=True), Path(tempfile.mkdtemp()))
    for _ in range(3):
        w.featurise(), w.train_step()
    TIMES.clear(), COUNTS.clear()
    feat, train = [], []
    for _ in range(calls):
        start = time.perf_counter()
        w.featurise()
        feat.append(time.perf_counter() - start)
        start = time.perf_counter()
        w.train_step()
        train.append(time.perf_counter() - start)
    for key in sorted(TIMES):
        per = TIMES[key] / COUNTS[key] * 1e6
        print(f"{key:28s} {COUNTS[key] / calls:5.0f} uses/call  {per:6.1f} us/use")
    print(
        f"featurisation {statistics.median(feat) * 1e3:.1f} ms, "
        f"training step {statistics.median(train) * 1e3:.1f} ms (medians of {calls})"
    )


if __name__ == "__main__":
    main()
