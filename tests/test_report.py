"""sdi.report without a browser: the report data against the results it came from, the page's
structure (self-contained, escaped, the data round-trips), linear size, JSON in and out, colours."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import sketched, stacked, two_checkpoints
from report_cases import GROUPS, NASTY, make_top, parse_page, texts, train_tokens

from sdi import report
from sdi.report import colors
from sdi.report.data import _nums, report_data
from sdi.report.html import render_html
from sdi.toy import next_token_loss, random_token_batches

LETTERS = "abcde"


def build(top, n_train=40, n_query=3, length=6, **kw):
    return report_data(
        top,
        train_texts=texts(n_train, "train"),
        query_texts=texts(n_query, "query"),
        train_tokens=train_tokens(n_train, length),
        query_tokens=train_tokens(n_query, length),
        decode=lambda t: LETTERS[t],
        **kw,
    )


def close(a, b):
    """Equal to the 4 significant digits the report keeps."""
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=0.0)


def test_report_data_holds_each_query_its_rows_texts_and_explanations():
    top = make_top(n_query=3, k=4, steps=5, length=6)
    se = torch.rand(40, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    data = build(top, tracin_se=se)
    assert (data["k"], data["steps"], data["groups"]) == (4, 5, list(GROUPS))
    assert data["has_se"] and data["has_explanations"]
    tokens = train_tokens(40, 6)
    for j, q in enumerate(data["queries"]):
        assert q["text"] == texts(3, "query")[j]
        assert q["tokens"] == [LETTERS[t] for t in tokens[j]]  # query rows use the same tokens
        for side in ("most", "least"):
            rows = q[side]
            assert len(rows) == 4
            for r, row in enumerate(rows):
                i = int(getattr(top, f"{side}_indices")[j, r])
                assert row["train"] == i
                assert close(row["tracin"], float(getattr(top, f"{side}_tracin")[j, r]))
                assert close(row["se"], float(se[i, j]))  # looked up at (train row, query)
                sdi = getattr(top, f"{side}_sdi")[j, r].tolist()
                assert all(close(a, b) for a, b in zip(row["sdi"], sdi, strict=True))
                e = getattr(top, f"{side}_explanations")[j][r]
                # Integers times 10**exp, the largest |value| of the pair 4 digits long.
                packed = [row["pos_train"], row["pos_query"], row["by_group"]]
                assert 1000 <= max(abs(v) for a in packed for line in a for v in line) <= 10000
                for ints, exact in zip(
                    packed, (e.positions_train, e.positions_query, e.by_parameter), strict=True
                ):
                    bound = max(
                        float(x.abs().max()) for x in (e.positions_train, e.positions_query)
                    )
                    decoded = np.asarray(ints, dtype=np.float64) * 10.0 ** row["exp"]
                    assert np.allclose(decoded, exact.numpy(), rtol=0, atol=1e-3 * bound)
                entry = data["train"][str(i)]
                assert entry["text"] == f"train {i}: " + ("bits 1 0 1" if i != 1 else NASTY)
                assert entry["tokens"] == [LETTERS[t] for t in tokens[i]]
    # Each referenced train example once, and only those.
    used = {int(i) for side in ("most", "least") for i in getattr(top, f"{side}_indices").flatten()}
    assert set(data["train"]) == {str(i) for i in used}


def test_numbers_keep_four_significant_digits():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(400, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
        -15, 15, (400,), generator=gen
    )
    values[:4] = torch.tensor([0.0, 1.0, -99995.0, 1234.5])
    got = _nums(values)
    assert got == [float(f"{v:.4g}") for v in values.tolist()]  # the same double as Python's
    assert _nums(torch.tensor([1.0, float("nan"), -float("inf")])) == [1.0, None, None]


def test_overview_is_the_mean_share_of_abs_sdi_per_step():
    top = make_top(n_query=5, k=3, steps=4)
    ov = build(top, n_query=5)["overview"]
    for side in ("most", "least"):
        sdi = getattr(top, f"{side}_sdi").numpy()
        shares = []
        for j in range(5):
            per_step = [sum(abs(sdi[j, r, t]) for r in range(3)) for t in range(4)]
            shares.append([v / sum(per_step) for v in per_step])
        expected = np.mean(shares, axis=0)
        assert np.allclose(ov[f"{side}_share"], expected, rtol=1e-3)
        if side == "most":
            peaks = np.argmax(shares, axis=1)
            assert ov["peak_counts"] == [int((peaks == t).sum()) for t in range(4)]
    assert ov["n_queries"] == 5


def test_unfilled_slots_and_non_finite_numbers_become_null():
    top = make_top(n_query=2, k=3, steps=4, explain=False)
    for name in ("least_indices", "least_tracin", "least_sdi"):
        getattr(top, name)[1, 2] = -1 if name == "least_indices" else float("nan")
    top.most_sdi[0, 0, 1] = float("inf")
    data = build(top, n_query=2)
    json.dumps(data, allow_nan=False)  # raises on any NaN / inf left
    row = data["queries"][1]["least"][2]
    assert row["train"] == -1 and row["tracin"] is None and row["sdi"] == [None] * 4
    assert data["queries"][0]["most"][0]["sdi"][1] is None
    assert not data["has_explanations"] and data["queries"][0]["most"][0]["pos_train"] is None
    assert not data["has_se"] and data["queries"][0]["most"][0]["se"] is None


def test_bad_inputs_name_the_culprit():
    top = make_top(n_query=3, k=2, steps=3)
    with pytest.raises(ValueError, match="train_texts"):
        report_data(top, query_texts=texts(3, "q"))
    with pytest.raises(ValueError, match="3 queries but 2 query"):
        report_data(top, train_texts=texts(40, "t"), query_texts=texts(2, "q"))
    with pytest.raises(IndexError, match="train row .* 5 train examples"):
        report_data(top, train_texts=texts(5, "t"), query_texts=texts(3, "q"))
    with pytest.raises(TypeError, match="one string per train row"):
        report_data(top, train_texts="abc", query_texts=texts(3, "q"))
    with pytest.raises(ValueError, match="7 tokens but its explanation 6 positions"):
        report_data(top, train_tokens=train_tokens(40, 7), query_texts=texts(3, "q"))
    with pytest.raises(ValueError, match=r"tracin_se must be \(N_train, N_query\)"):
        report_data(top, train_texts=texts(40, "t"), query_texts=texts(3, "q"), tracin_se=[1.0])
    with pytest.raises(IndexError, match="tracin_se has 2 train rows"):
        build(top, tracin_se=torch.ones(2, 3))
    with pytest.raises(ValueError, match="2 step_labels for 3 steps"):
        build(top, step_labels=["a", "b"])
    with pytest.raises(ValueError, match="page_size"):
        render_html(build(top), page_size=0)
    with pytest.raises(ValueError, match="report_data"):
        render_html({"queries": []})


def _script_blocks(page: str) -> dict[str, str]:
    return dict(re.findall(r'<script id="([^"]+)" type="application/json">(.*?)</script>', page))


def test_page_is_self_contained_escaped_and_carries_the_data():
    data = build(make_top(n_query=3, k=2, steps=3), title="<b>parity</b> & co")
    page = render_html(data, page_size=7)
    root = parse_page(page)
    # Nothing to fetch: no external script, style sheet, font, image, frame or CSS import.
    assert not [n.tag for n in root.iter() if "src" in n.attrs or n.tag in ("link", "iframe")]
    assert "@import" not in page and "url(" not in page
    assert set(re.findall(r"https?://[^\s\"')]+", page)) == {"http://www.w3.org/2000/svg"}
    # Text stays text: the markup in example 1 never appears raw, the title is escaped.
    assert NASTY not in page and "<b>parity</b>" not in page
    assert root.find_all("title")[0].text() == "<b>parity</b> & co"
    assert len(root.find_all("script")) == 4  # error trap, config, data, the drawing script
    blocks = _script_blocks(page)
    assert json.loads(blocks["sdi-data"]) == data  # the embedded JSON is the data, unchanged
    assert json.loads(blocks["sdi-config"])["page_size"] == 7
    assert root.find_all(id="queries") and root.find_all(id="sdi-errors")
    assert "3 queries, the 2 most and 2 least" in root.find_all("p", "summary")[0].text()


def test_file_size_grows_linearly_with_the_queries():
    sizes = []
    for n in (10, 20, 40):
        top = make_top(n_query=n, k=3, steps=4, n_train=40)
        sizes.append(len(render_html(build(top, n_query=n)).encode()))
    step1, step2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert step2 == pytest.approx(2 * step1, rel=0.1), sizes


def test_json_round_trip_and_report_from_a_results_file(tmp_path):
    top = make_top(n_query=2, k=3, steps=4)
    top.least_tracin[1, 2] = float("nan")
    back = report.top_influences_from_dict(
        json.loads(json.dumps(report.top_influences_to_dict(top)))
    )
    for name in ("most_indices", "least_indices", "most_sdi", "least_tracin", "n_excluded"):
        a, b = getattr(top, name), getattr(back, name)
        assert torch.allclose(a.double(), b.double(), equal_nan=True), name
    e, f = top.most_explanations[1][2], back.most_explanations[1][2]
    assert (e.train, e.query, e.groups) == (f.train, f.query, f.groups)
    assert torch.allclose(e.positions_query, f.positions_query.double())
    kwargs = dict(train_texts=texts(40, "train"), query_texts=texts(2, "query"))
    direct = report.report_data(back, **kwargs)
    results = {"top_influences": report.top_influences_to_dict(top), **kwargs}
    for name, content in (
        ("raw.json", results),
        ("data.json", direct),
        ("nested.json", {"report": direct, "other": 1}),
    ):
        (tmp_path / name).write_text(json.dumps(content))
        out = report.write_html_from_json(tmp_path / name, tmp_path / f"{name}.html")
        assert json.loads(_script_blocks(out.read_text())["sdi-data"]) == direct, name
    (tmp_path / "bad.json").write_text('{"nothing": 1}')
    with pytest.raises(ValueError, match="holds no report"):
        report.write_html_from_json(tmp_path / "bad.json", tmp_path / "x.html")


def test_write_html_writes_the_page(tmp_path, capsys):
    top = make_top(n_query=2, k=2, steps=3)
    path = report.write_html(
        tmp_path / "r.html",
        top,
        train_texts=texts(40, "t"),
        query_texts=texts(2, "q"),
        progress=True,
    )
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "report: 100%" in capsys.readouterr().err  # the progress bar over the queries


def _lab(hex_colour: str) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) of an sRGB colour, from the standard formulas."""
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
    x, y, z = (sum(a * b for a, b in zip(row, lin, strict=True)) for row in m)
    white = (0.95047, 1.0, 1.08883)
    f = [
        v ** (1 / 3) if v > 216 / 24389 else (24389 / 27 * v + 16) / 116
        for v in (x / white[0], y / white[1], z / white[2])
    ]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def test_colour_scale_reads_in_lightness_and_along_blue_yellow():
    stops = colors.diverging_stops()
    assert len(stops) == colors.N_STOPS and colors.N_STOPS % 2 == 1
    lab = [_lab(c) for c in stops]
    mid = len(stops) // 2
    lightness = [v[0] for v in lab]
    # Lightness rises strictly towards 0 from both ends: the size of a value reads in grey too.
    assert all(a < b for a, b in zip(lightness[:mid], lightness[1 : mid + 1], strict=True))
    assert all(a > b for a, b in zip(lightness[mid:-1], lightness[mid + 1 :], strict=True))
    assert lightness[mid] > 95 and abs(lab[mid][1]) < 2 and abs(lab[mid][2]) < 2  # near-white 0
    # The sign is carried by blue (b* < 0) against orange (b* > 0), the axis that red-green
    # colour-vision deficiencies keep.
    assert all(v[2] < -5 for v in lab[: mid - 1]) and all(v[2] > 5 for v in lab[mid + 2 :])
    assert colors.diverging(-3.0) == stops[0] and colors.diverging(3.0) == stops[-1]


def test_a_real_top_influences_with_explanations(tmp_path, train_batches):
    """From the estimator to the page: tokens label every position of the explanations, the
    heatmaps' rows add up to the pair's SDI, and TracIn ± SE come from the same run."""
    a, _, specs = two_checkpoints(tmp_path, 0.4, 1.1)
    query = random_token_batches(3, 2, 7, 19, seed=3)
    est = sketched(a)
    common = dict(
        checkpoints=specs, train_loader=train_batches, query_loader=query, loss_fn=next_token_loss
    )
    se = est.influence_across_checkpoints(mode="tracin", with_standard_errors=True, **common)
    top = est.top_influences(k=2, explain=True, **common)
    est.close()
    vocab = [f"w{t}" for t in range(19)]
    path = report.write_html(
        tmp_path / "r.html",
        top,
        train_tokens=stacked(train_batches),
        query_tokens=stacked(query),
        decode=vocab.__getitem__,
        tracin_se=se.tracin_se,
    )
    data = json.loads(_script_blocks(path.read_text())["sdi-data"])
    train = stacked(train_batches)
    assert data["has_explanations"] and data["groups"] == list(top.most_explanations[0][0].groups)
    for j, q in enumerate(data["queries"]):
        assert q["text"] == " ".join(vocab[t] for t in stacked(query)[j].tolist())
        for side in ("most", "least"):
            for r, row in enumerate(q[side]):
                i = int(getattr(top, f"{side}_indices")[j, r])
                assert data["train"][str(i)]["tokens"] == [vocab[t] for t in train[i].tolist()]
                assert len(row["pos_train"]) == 7 and len(row["pos_query"]) == 7
                for key in ("pos_train", "pos_query", "by_group"):
                    summed = np.sum(row[key], axis=0) * 10.0 ** row["exp"]
                    assert np.allclose(
                        summed, row["sdi"], rtol=5e-3, atol=1e-3 * max(map(abs, row["sdi"]))
                    )
                assert close(row["se"], float(se.tracin_se[i, j]))
