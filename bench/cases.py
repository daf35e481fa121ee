"""The one table of sketch-op cases, shared by the CPU suite (``bench/speed/test_sketch_ops.py``),
the GPU script (``bench/gpu/gpu.py``) and the compile-time report (``bench/gpu/kernel_report.py``).

Each case lists the devices it is timed on: the CPU suite takes the ``"cpu"`` cases (and the
``"cuda"`` ones too when CUDA is present), the GPU script the ``"cuda"`` ones, the report compiles
the launch configurations of the ``"cuda"`` ones. ``--smoke`` runs of the GPU script use the tiny
``SMOKE_*`` cases on the CPU interpreter.
"""

from __future__ import annotations

CPU, GPU = ("cpu",), ("cuda",)

# (B, T, d_in, d_out, m), devices. The paper-like shape is DESIGN.md section 5's GPU target.
PAPER_LINEAR = (8, 2048, 4096, 4096, 2048)
LINEAR = [
    ((32, 64, 128, 384, 1024), CPU + GPU),  # the CPU workload's qkv use
    ((32, 64, 512, 128, 1024), CPU + GPU),  # its fc2 use
    ((8, 512, 256, 256, 1024), CPU + GPU),  # long sequences
    ((4, 256, 1024, 1024, 2048), CPU + GPU),  # a layer past the explicit/FFT crossover
    (PAPER_LINEAR, GPU),
    ((32, 512, 1024, 1024, 1024), GPU),
]
# (rows, d, m)
COUNT = [((2048, 512, 1024), CPU + GPU)]
# (B, T, vocab, d, m)
EMBEDDING = [((32, 64, 256, 128, 1024), CPU), ((8, 2048, 50_000, 1024, 2048), GPU)]
# Looped GPT-style model for the GPU end-to-end case: (vocab, d_model, heads, tau, seq, batch, m);
# 2 * 50257 * 1152 (embedding + head) + 12 * 1152^2 (the shared block) ~ 132M parameters.
MODEL = (50257, 1152, 18, 32, 128, 8, 2048)

SMOKE_LINEAR = [(2, 8, 48, 40, 64), (3, 4, 32, 32, 128)]
SMOKE_EMBEDDING = (2, 8, 500, 32, 64)
SMOKE_MODEL = (64, 32, 2, 2, 8, 2, 64)


def on(cases, device: str) -> list[tuple]:
    """The shapes of ``cases`` timed on ``device`` (``"cpu"`` or ``"cuda"``)."""
    return [shape for shape, devices in cases if device in devices]


# The GPU script's timed Linear cases (also the report's bench shapes).
LINEAR_CASES = on(LINEAR, "cuda")
