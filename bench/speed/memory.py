"""Peak memory of streaming influence vs the training-set size, next to the reference's design.

    python bench/speed/memory.py [--out bench/results/memory.md]

Each N_train runs in a fresh process: build a toy looped transformer, run
``influence_across_checkpoints(mode="sdi")`` over N_train examples and 16 queries, and report two
growths over the footprint just before the call: the heap bytes in use (glibc ``mallinfo2``,
sampled as every batch starts: what the run retains) and peak RSS (which also counts allocator
fragmentation and per-batch temporaries). The reference 0.1.1 keeps every train example's per-step,
per-parameter sketch: ``N_train x params x steps x m x 4`` bytes, printed as the estimate beside
ours (the output tensor is the same for both).
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (256, 1024, 4096)
M, STEPS, D, SEQ, VOCAB, N_QUERY = 512, 4, 32, 16, 64, 16


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not yet had back (heap chunks + mmapped chunks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def child(n_train: int) -> None:
    import torch

    from sdi import CheckpointSpec, ProjectedTracInSDI
    from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches

    torch.manual_seed(0)
    model = LoopedTransformer(vocab=VOCAB, d_model=D, n_heads=4, loop_steps=STEPS, max_len=SEQ)
    model.eval()

    class Train:  # generated lazily: the data set itself should not count as our memory
        def __iter__(self):  # re-iterable: every pass generates the same batches again
            for i in range(0, n_train, 32):
                gen = torch.Generator().manual_seed(i)
                yield {"tokens": torch.randint(0, VOCAB, (32, SEQ), generator=gen)}

    heap = []

    def loss_fn(model, batch):
        heap.append(_heap_in_use())
        return next_token_loss(model, batch)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck.pt"
        torch.save({"model_state_dict": model.state_dict()}, path)
        query = random_token_batches(N_QUERY, N_QUERY, SEQ, VOCAB, seed=1)
        est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=M)
        common = dict(checkpoints=[CheckpointSpec(path)], query_loader=query, loss_fn=loss_fn)
        est.influence_across_checkpoints(train_loader=[next(iter(Train()))], **common)  # warm-up
        heap.clear()
        before_heap, before_rss = _heap_in_use(), _rss_bytes()
        start = time.perf_counter()
        out = est.influence_across_checkpoints(train_loader=Train(), **common)
        seconds = time.perf_counter() - start
    params = sum(1 for _ in model.core.parameters())
    reference = n_train * params * STEPS * M * 4
    grown_heap, grown_rss = max(heap) - before_heap, _rss_bytes() - before_rss
    print(n_train, grown_heap, grown_rss, out.sdi.numel() * 4, reference, f"{seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory.md"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    mib = 1 << 20
    rows = []
    for n in SIZES:
        line = subprocess.run(
            [sys.executable, __file__, "--child", str(n)],
            check=True,
            capture_output=True,
            text=True,
        )
        n_train, heap, rss, output, reference, seconds = line.stdout.split()
        rows.append(
            f"| {n_train} | {int(heap) / mib:.2f} | {int(rss) / mib:.1f} | {int(output) / mib:.2f} "
            f"| {int(reference) / mib:.0f} | {seconds} |"
        )
        print(rows[-1], flush=True)
    import torch

    text = "\n".join(
        [
            '# Peak memory vs N_train (streaming `influence_across_checkpoints`, mode="sdi")',
            "",
            f"- machine: {platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}",
            "- command: `python bench/speed/memory.py`",
            f"- workload: toy looped transformer d={D}, 4 heads, tau={STEPS}, seq {SEQ}, m={M}, "
            f"{N_QUERY} queries, batch 32, target = the looped block",
            "- ours: growth over the footprint before the call (fresh process per row, after a warm-up "
            "call) of heap bytes in use, sampled at every batch, and of peak RSS",
            "- reference design: N_train x params x steps x m x 4 bytes of stored train sketches (estimate)",
            "",
            "| N_train | ours: heap in use (MiB) | ours: peak RSS (MiB) | output tensor (MiB) "
            "| reference design: train sketches (MiB) | seconds |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
