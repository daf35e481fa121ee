"""Memory vs the training-set size (pytest-benchmark; ``make bench``).

Runs ``bench/speed/memory.py --child N`` -- streaming ``influence_across_checkpoints(mode="sdi")`` over N
train examples of a toy looped transformer, in a fresh process -- for the smallest and largest
N_train of ``memory.SIZES``, times it, and keeps in ``extra_info`` what that process measured: the
growth of the heap bytes in use and of peak RSS over its footprint before the call, the output
tensor's bytes, and the reference design's stored train sketches for comparison. The target
(DESIGN §5): from the smallest to the largest N_train, memory grows only by the output tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import memory
import pytest

MEMORY_SCRIPT = Path(memory.__file__).resolve()


@pytest.mark.parametrize("n_train", [min(memory.SIZES), max(memory.SIZES)])
def test_memory_vs_n_train(benchmark, n_train):
    lines: list[str] = []

    def run():
        done = subprocess.run(
            [sys.executable, str(MEMORY_SCRIPT), "--child", str(n_train)],
            check=True,
            capture_output=True,
            text=True,
        )
        lines.append(done.stdout.strip().splitlines()[-1])  # the child's measurements

    benchmark.group = "memory vs N_train"
    benchmark.pedantic(run, rounds=1)
    n, heap, rss, output, reference, _ = (int(float(x)) for x in lines[-1].split())
    assert n == n_train
    benchmark.extra_info.update(
        n_train=n,
        heap_growth_bytes=heap,
        rss_growth_bytes=rss,
        output_bytes=output,
        reference_design_bytes=reference,
    )
