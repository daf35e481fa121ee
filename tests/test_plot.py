"""sdi.plot: headless figures whose plotted data, read back from the artists, equal the inputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from sdi import plot  # noqa: E402


@pytest.fixture
def sdi():
    return torch.randn(9, 3, 5, generator=torch.Generator().manual_seed(0))


def test_import_sdi_does_not_import_matplotlib():
    code = "import sys, sdi, sdi.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_top_train_ranks_by_tracin_and_by_magnitude(sdi):
    tracin = sdi[:, 1].sum(1)
    assert list(plot.top_train(sdi, 1, 4)) == tracin.argsort(descending=True)[:4].tolist()
    assert (
        list(plot.top_train(sdi, 1, 4, by="abs"))
        == tracin.abs().argsort(descending=True)[:4].tolist()
    )
    with pytest.raises(ValueError, match="by must be"):
        plot.top_train(sdi, 1, 4, by="loss")


def test_sdi_heatmap_shows_the_top_rows(sdi, tmp_path):
    path = tmp_path / "heatmap.png"
    fig = plot.sdi_heatmap(sdi, query=2, k=4, path=path)
    assert path.stat().st_size > 0
    ax = fig.axes[0]
    rows = sdi[:, 2].sum(1).argsort(descending=True)[:4]
    np.testing.assert_allclose(ax.images[0].get_array(), sdi[rows, 2].double().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in rows.tolist()]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(t) for t in range(5)]


def test_step_influence_lines_equal_the_sdi_rows(sdi, tmp_path):
    path = tmp_path / "lines.png"
    fig = plot.step_influence(sdi.numpy(), query=0, train=[3, 7], path=path)
    assert path.stat().st_size > 0
    lines = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("train")]
    assert [ln.get_label() for ln in lines] == ["train 3", "train 7"]
    for line, i in zip(lines, [3, 7], strict=True):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
        np.testing.assert_allclose(line.get_ydata(), sdi[i, 0].double().numpy())


def test_step_matrix_heatmap_shows_the_pair(tmp_path):
    matrix = torch.randn(4, 2, 3, 6, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "matrix.png"
    labels = ["prelude", "s1", "s2"]
    fig = plot.step_matrix_heatmap(matrix[..., :3], train=2, query=1, step_labels=labels, path=path)
    assert path.stat().st_size > 0
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), matrix[2, 1, :, :3].double().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    # a single (S_tr, S_q) matrix, drawn into a given axes
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert plot.step_matrix_heatmap(matrix[0, 0], ax=ax2) is fig2
    np.testing.assert_allclose(ax2.images[0].get_array(), matrix[0, 0].double().numpy())
    with pytest.raises(ValueError, match="needs train and query"):
        plot.step_matrix_heatmap(matrix)


def _explanation():
    from sdi import PairExplanation

    gen = torch.Generator().manual_seed(4)
    by_parameter = torch.randn(3, 4, generator=gen)
    return PairExplanation(
        train=2,
        query=1,
        sdi=by_parameter.sum(0),
        positions_train=torch.randn(5, 4, generator=gen),
        positions_query=torch.randn(6, 4, generator=gen),
        by_parameter=by_parameter,
        groups=("attn", "mlp", "other"),
    )


def test_position_step_heatmap_shows_a_side_with_token_labels(tmp_path):
    e = _explanation()
    path = tmp_path / "positions.png"
    fig = plot.position_step_heatmap(
        e, tokens=[3, 1, 4, 1, 5], decode=lambda t: f"<{t}>", path=path
    )
    assert path.stat().st_size > 0
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), e.positions_train.double().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["<3>", "<1>", "<4>", "<1>", "<5>"]
    fig = plot.position_step_heatmap(e, side="query", tokens=list("abcdef"))
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(), e.positions_query.double().numpy()
    )
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list("abcdef")
    with pytest.raises(ValueError, match="3 tokens for 5 positions"):
        plot.position_step_heatmap(e, tokens=[1, 2, 3])
    with pytest.raises(ValueError, match="side must be"):
        plot.position_step_heatmap(e, side="both")


def test_parameter_step_plot_stacks_to_the_total(tmp_path):
    e = _explanation()
    path = tmp_path / "groups.png"
    fig = plot.parameter_step_plot(e, path=path)
    assert path.stat().st_size > 0
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["attn", "mlp", "other"]
    heights = np.array([[bar.get_height() for bar in c] for c in ax.containers])
    np.testing.assert_allclose(heights, e.by_parameter.double().numpy(), rtol=1e-6)
    # stacked: each bar starts where the same-signed shares below it end
    shares = e.by_parameter.double().numpy()
    up = np.concatenate([np.zeros((1, 4)), np.maximum(shares, 0).cumsum(0)[:-1]])
    down = np.concatenate([np.zeros((1, 4)), np.minimum(shares, 0).cumsum(0)[:-1]])
    bottoms = np.array([[bar.get_y() for bar in c] for c in ax.containers])
    tops = np.where(shares >= 0, up, down)
    np.testing.assert_allclose(bottoms, tops, rtol=1e-6, atol=1e-12)
    (total,) = [ln for ln in ax.lines if ln.get_label() == "SDI (total)"]
    np.testing.assert_allclose(total.get_ydata(), e.sdi.double().numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="one name per group"):
        plot.parameter_step_plot(e.by_parameter, groups=["a"])
