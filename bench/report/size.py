"""The HTML report at size: file size and time to write it for 10, 100 and 1,000 queries (k=10,
8 loop steps, 8 positions per sequence, with and without explanations), and the time headless
Chromium takes to open it and draw the first page, in one run -> bench/results/report-size.md.

    python bench/report/size.py [--queries 10 100 1000] [--out bench/results/report-size.md]

The results are synthetic (random numbers shaped like top_influences(..., explain=True)); the size
depends on the shapes, not on the values beyond their digit count (4 significant digits kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from sdi import PairExplanation, TopInfluences, report

K, STEPS, LENGTH, N_TRAIN, GROUPS = 10, 8, 8, 5000, ("attention", "mlp")


def synthetic_top(n_query: int, explain: bool, seed: int = 0) -> TopInfluences:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 1e-3

    fields = {}
    for side in ("most", "least"):
        idx = torch.randint(0, N_TRAIN, (n_query, K), generator=gen)
        sdi = randn(n_query, K, STEPS)
        fields.update({f"{side}_indices": idx, f"{side}_tracin": sdi.sum(-1), f"{side}_sdi": sdi})
        fields[f"{side}_explanations"] = (
            [
                [
                    PairExplanation(
                        train=int(idx[j, r]),
                        query=j,
                        sdi=sdi[j, r],
                        positions_train=randn(LENGTH, STEPS),
                        positions_query=randn(LENGTH, STEPS),
                        by_parameter=randn(len(GROUPS), STEPS),
                        groups=GROUPS,
                    )
                    for r in range(K)
                ]
                for j in range(n_query)
            ]
            if explain
            else None
        )
    return TopInfluences(**fields)


def open_in_chromium(path: Path, profile: Path) -> tuple[float, float] | None:
    """``(seconds to the first page drawn, as the page measured it; seconds for the whole headless
    run: browser start, load, draw, DOM dump)``, or ``None`` without Chromium."""
    browser = shutil.which("chromium")
    if browser is None:
        return None
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    start = time.perf_counter()
    run = subprocess.run([*command, "--dump-dom", path.as_uri()], capture_output=True, timeout=300)
    seconds = time.perf_counter() - start
    drawn = re.search(rb'data-drawn-ms="(\d+)"', run.stdout)
    if drawn is None:
        raise RuntimeError(f"{path.name}: the page did not finish drawing")
    return int(drawn.group(1)) / 1e3, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", type=Path, default=Path("bench/results/report-size.md"))
    args = parser.parse_args()
    tokens = [[(i * 7 + p) % 2 for p in range(LENGTH)] for i in range(N_TRAIN)]
    lines = [
        "# The HTML report at size",
        "",
        f"`python bench/report/size.py` on {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}: k={K} most and {K} least per query, {STEPS} loop steps, "
        f"{LENGTH} tokens per sequence, {N_TRAIN} train examples, synthetic scores; load average "
        f"{os.getloadavg()[0]:.1f} before the run. "
        "Median of 3 opens each. *first page drawn*: from opening the file to the first page of 10 queries drawn, as the "
        "page measures it (`performance.now()`: reading the file, parsing it and its JSON, "
        "drawing); *headless run*: the whole `chromium --headless --dump-dom` call (browser "
        "start and writing the DOM out included).",
        "",
        "| queries | explanations | file size | bytes per query | write (s) | first page drawn (s) "
        "| headless run (s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for explain in (True, False):
            for n in args.queries:
                top = synthetic_top(n, explain)
                path = Path(tmp) / f"report_{n}_{explain}.html"
                start = time.perf_counter()
                report.write_html(
                    path,
                    top,
                    train_tokens=tokens,
                    query_tokens=tokens[:n],
                    join="",
                    tracin_se=None,
                    progress=n >= 1000,
                )
                write = time.perf_counter() - start
                size = path.stat().st_size
                # The median of 3 opens: a shared machine's load makes single runs noisy.
                opens = [open_in_chromium(path, Path(tmp) / "profile") for _ in range(3)]
                if opens[0] is None:
                    shown = "n/a | n/a"
                else:
                    drawn, whole = (statistics.median(v) for v in zip(*opens, strict=True))
                    shown = f"{drawn:.2f} | {whole:.1f}"
                row = (
                    f"| {n} | {'yes' if explain else 'no'} | {size / 1e6:.2f} MB | "
                    f"{size / n / 1e3:.1f} kB | {write:.2f} | {shown} |"
                )
                print(row, flush=True)
                lines.append(row)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
