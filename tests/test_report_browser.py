"""The report in a real browser: headless Chromium opens the generated file and the test reads the
rendered DOM (query text, k rows per side, one SVG path per trajectory, heatmap cells), checks that
no script error or console message occurred, and saves a screenshot.

Skips only where no Chromium is installed (`.ci/run` installs the Debian package `chromium`).
Set SDI_REPORT_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from report_cases import GROUPS, NASTY, make_top, parse_page, texts, train_tokens

from sdi import report

N_QUERY, K, STEPS, LENGTH, PAGE = 12, 4, 5, 6, 10


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "no Chromium found, and none could be installed here: install the Debian package with "
        "`apt-get update && apt-get install -y chromium` as root (.ci/run does this)"
    )


def _run(browser: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        url,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _console(stderr: str) -> list[str]:
    """The page's console messages and uncaught errors that Chromium logged."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    browser = _browser()
    folder = tmp_path_factory.mktemp("report")
    top = make_top(n_query=N_QUERY, k=K, steps=STEPS, n_train=40, length=LENGTH)
    path = report.write_html(
        folder / "report.html",
        top,
        train_texts=texts(40, "train"),
        query_texts=texts(N_QUERY, "query"),
        train_tokens=train_tokens(40, LENGTH),
        query_tokens=train_tokens(N_QUERY, LENGTH),
        decode=lambda t: "<i>"[t % 3],  # tokens that look like markup, too
        page_size=PAGE,
    )
    return browser, folder, path, top


def _dump(page, fragment: str = "", path: Path | None = None):
    browser, folder, default, _ = page
    # The virtual-time budget lets the tasks the page queued (row "toggle" events) run first.
    url = (path or default).as_uri() + fragment
    run = _run(browser, folder / "profile", url, "--virtual-time-budget=2000", "--dump-dom")
    return parse_page(run.stdout), run.stderr


def _check_query(section, j: int, top, explained_rows: int):
    assert section.attrs["data-query"] == str(j)
    (text,) = section.find_all("div", "query-text")
    assert text.text() == texts(N_QUERY, "query")[j]
    for side in ("most", "least"):
        rows = section.find_all("tr", "row", data_side=side)
        assert len(rows) == K, side
        expected = [str(int(i)) for i in getattr(top, f"{side}_indices")[j]]
        assert [r.attrs["data-train"] for r in rows] == expected  # in rank order
        for row in rows:  # one trajectory path per row, through every step
            (path,) = row.find_all("path")
            assert "trajectory" in path.classes()
            assert path.attrs["d"].count("L") == STEPS - 1
            assert len(row.find_all("circle")) == STEPS
            assert all(c.find_all("title") for c in row.find_all("circle"))  # numbers on hover
    assert len(section.find_all("path", "trajectory")) == 2 * K
    cells = (LENGTH + LENGTH + len(GROUPS)) * STEPS  # train x steps, query x steps, groups x steps
    assert len(section.find_all("rect", "cell")) == explained_rows * cells
    steps = section.find_all("table", "steps")  # the numbers beside each opened pair's heatmaps
    assert len(steps) == explained_rows
    assert all(len(t.find_all("tbody")[0].find_all("tr")) == STEPS for t in steps)


def _no_errors(root, stderr: str):
    (errors,) = root.find_all(id="sdi-errors")
    assert errors.text() == "" and "hidden" in errors.attrs
    assert _console(stderr) == []
    (body,) = root.find_all("body")
    assert body.attrs.get("data-rendered") == "1"  # the script ran to its end


def test_first_page_renders_each_query_with_k_rows_a_side(page):
    root, stderr = _dump(page)
    _no_errors(root, stderr)
    top = page[3]
    sections = root.find_all("section", "query")
    assert [s.attrs["data-query"] for s in sections] == [str(j) for j in range(PAGE)]
    for j, section in enumerate(sections):
        _check_query(section, j, top, explained_rows=1)  # the top row opens with its heatmaps
    # Example 1's markup stays text: no element was made from it.
    assert len(root.find_all("script")) == 4 and not root.find_all("b")
    assert any(NASTY in r.text() for r in root.find_all("div", "train-text"))
    (info,) = root.find_all(id="page-info")
    assert info.text() == f"page 1 of 2 ({N_QUERY} of {N_QUERY} queries)"
    (overview,) = root.find_all("table", "overview-table")
    assert len(overview.find_all("tbody")[0].find_all("tr")) == STEPS
    assert len(root.find_all("rect", "bar")) == 2 * STEPS
    legend = root.find_all("svg", "scale")[0]
    assert len(legend.find_all("rect")) == 21 and "colour scale" in legend.attrs["aria-label"]


def test_second_page_all_rows_open_and_filter(page):
    root, stderr = _dump(page, "#page=2&open=all")
    _no_errors(root, stderr)
    sections = root.find_all("section", "query")
    assert [s.attrs["data-query"] for s in sections] == ["10", "11"]
    for section in sections:
        _check_query(section, int(section.attrs["data-query"]), page[3], explained_rows=2 * K)
    root, stderr = _dump(page, "#filter=%237")  # "#7": query 7 only
    _no_errors(root, stderr)
    assert [s.attrs["data-query"] for s in root.find_all("section", "query")] == ["7"]


def test_without_explanations_and_with_unfilled_slots(page):
    """Results without explanations or SE, a query with fewer than k finite scores: the rows
    still render, the missing ones say so, and nothing throws."""
    browser, folder, _, _ = page
    top = make_top(n_query=2, k=K, steps=STEPS, explain=False)
    for name, value in (("least_indices", -1), ("least_tracin", float("nan"))):
        getattr(top, name)[1, K - 1] = value
    top.least_sdi[1, K - 1] = float("nan")
    top.n_excluded[1] = 1
    path = report.write_html(
        folder / "plain.html", top, train_texts=texts(40, "t"), query_texts=texts(2, "q")
    )
    root, stderr = _dump(page, "#open=all", path=path)
    _no_errors(root, stderr)
    first, second = root.find_all("section", "query")
    assert len(second.find_all("tr", "row", data_side="least")) == K
    assert len(second.find_all("path", "trajectory")) == 2 * K - 1  # none for the empty slot
    assert "no finite score" in second.find_all("tr", "empty")[0].text()
    meta = second.find_all("p", "meta")[0].text()
    assert "1 non-finite TracIn score not ranked" in meta and "explain=True" in meta
    # Opened rows hold their SDI per step as numbers, and no heatmap.
    tables = second.find_all("table", "steps")
    assert len(tables) == 2 * K - 1 and len(tables[0].find_all("tbody")[0].find_all("tr")) == STEPS
    assert len(first.find_all("table", "steps")) == 2 * K
    assert not root.find_all("rect", "cell") and not root.find_all("table", "groups")


def test_a_script_error_is_caught(page):
    """The error checks above can fail: a page whose script throws is reported by both."""
    browser, folder, path, _ = page
    broken = folder / "broken.html"
    markup = path.read_text(encoding="utf-8")
    broken.write_text(markup.replace("drawControls();\n", "drawControls(); null.x;\n", 1))
    run = _run(browser, folder / "profile", broken.as_uri(), "--dump-dom")
    (errors,) = parse_page(run.stdout).find_all(id="sdi-errors")
    assert "null" in errors.text() and "hidden" not in errors.attrs
    assert any("Uncaught TypeError" in line for line in _console(run.stderr))


def test_screenshot(page):
    browser, folder, path, _ = page
    shot = Path(os.environ.get("SDI_REPORT_SCREENSHOT") or folder / "report.png")
    _run(
        browser,
        folder / "profile",
        path.as_uri(),
        "--hide-scrollbars",
        "--window-size=1280,1500",
        f"--screenshot={shot}",
    )
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1280, 1500)  # IHDR: width, height
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
