"""Per-score standard errors (sdi.uncertainty) against true variances over the hash draw.

Tiny sketches are enumerated exhaustively -- every bucket table and every sign table -- so the true
variance of ``<Sx, Sy>`` is known exactly; the sketches are built here from the definition, not
from the package. Each draw is fed to ``standard_errors`` as its own parameter block: the returned
variance is then the sum of the per-draw estimates, i.e. ``n_draws`` times their mean.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdi import ProjectedTracInSDI
from sdi.toy import next_token_loss
from sdi.uncertainty import SketchErrors, standard_errors


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared machine: thread wake-ups would dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_tables(d: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (bucket, sign) table of ``d`` coordinates: ``(n_draws, d)`` each, float64 signs."""
    h = torch.cartesian_prod(*[torch.arange(m)] * d).reshape(-1, d)
    s = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * d).reshape(-1, d)
    return h.repeat_interleave(len(s), 0), s.repeat(len(h), 1)


def scatter(values: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """``values``, ``index`` ``(n, d)`` -> ``(n, m)``: bucket sums."""
    return torch.zeros(values.shape[0], m, dtype=values.dtype).scatter_add_(1, index, values)


def mean_predicted_variance(sx: torch.Tensor, sy: torch.Tensor, m: int) -> float:
    """Mean of the per-draw variance estimates; ``sx``, ``sy`` are ``(n_draws, m)`` sketches."""
    n = sx.shape[0]
    columns = [slice(k * m, (k + 1) * m) for k in range(n)]
    train, query = sx.reshape(1, -1).float(), sy.reshape(1, 1, -1).float()
    sdi_se, tracin_se = standard_errors(train, query, columns, m)
    assert sdi_se.shape == (1, 1, 1) and tracin_se.shape == (1, 1)
    torch.testing.assert_close(tracin_se, sdi_se[..., 0])  # one step: TracIn is that step
    return sdi_se.double().square().item() / n


def test_count_sketch_estimate_is_unbiased_exhaustively():
    d, m = 4, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    y = 0.6 * x + torch.randn(d, generator=gen, dtype=torch.float64)
    h, s = all_tables(d, m)
    sx, sy = scatter(s * x, h, m), scatter(s * y, h, m)
    est = (sx * sy).sum(1)
    torch.testing.assert_close(est.mean(), x @ y)
    true_var = est.var(unbiased=False).item()
    textbook = ((x @ x) * (y @ y) + (x @ y) ** 2 - 2 * (x * x * y * y).sum()).item() / m
    assert true_var == pytest.approx(textbook, rel=1e-9)
    assert mean_predicted_variance(sx, sy, m) == pytest.approx(true_var, rel=1e-3)


def tensor_sketches(phi, psi, h, s, m):
    """TensorSketches of ``(d_out, d_in)`` matrices; tables ``h``, ``s``: ``(n, d_out + d_in)``."""
    d_out = phi.shape[0]
    index = ((h[:, :d_out, None] + h[:, None, d_out:]) % m).reshape(len(h), -1)
    sign = (s[:, :d_out, None] * s[:, None, d_out:]).reshape(len(s), -1)
    return scatter(sign * phi.reshape(-1), index, m), scatter(sign * psi.reshape(-1), index, m)


def test_tensor_sketch_estimate_matches_true_variance_exhaustively():
    m = 8
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    psi = phi + 0.5 * torch.randn(2, 2, generator=gen, dtype=torch.float64)
    sx, sy = tensor_sketches(phi, psi, *all_tables(4, m), m)
    est = (sx * sy).sum(1)
    torch.testing.assert_close(est.mean(), (phi * psi).sum())
    true_var = est.var(unbiased=False).item()
    # TensorSketch's estimate carries a relative O(1/m) bias (about 0.9/m here).
    assert mean_predicted_variance(sx, sy, m) == pytest.approx(true_var, rel=0.15)


def test_tensor_sketch_estimate_covers_rank_one_structure():
    """Aligned rank-one gradients (one token): TensorSketch's variance far exceeds CountSketch's."""
    d, m, draws = 8, 64, 4000
    gen = torch.Generator().manual_seed(2)
    phi = torch.outer(torch.randn(d, generator=gen), torch.randn(d, generator=gen)).double()
    psi = 1.5 * phi
    h = torch.randint(0, m, (draws, 2 * d), generator=gen)
    s = torch.randint(0, 2, (draws, 2 * d), generator=gen).double() * 2 - 1
    sx, sy = tensor_sketches(phi, psi, h, s, m)
    true_var = (sx * sy).sum(1).var().item()  # Monte Carlo: about 4 % noise
    assert mean_predicted_variance(sx, sy, m) == pytest.approx(true_var, rel=0.12)
    count_sketch_formula = ((phi * phi).sum() * (psi * psi).sum() + (phi * psi).sum() ** 2) / m
    assert true_var > 1.5 * count_sketch_formula.item()


def test_standard_errors_of_featurized_scores_match_spread_over_seeds(train_batches, query_batches):
    """Tiny looped model: the spread of projected SDI / TracIn over hash seeds vs the estimate."""
    model, m, seeds = tiny_model(), 64, 24
    sdi_runs, sdi_var, tracin_runs, tracin_var = [], [], [], []
    for seed in range(seeds):
        est = ProjectedTracInSDI(
            model=model, target_modules=model.core, projection_size=m, seed=seed
        )
        train = est.featurize_loader(loader=train_batches, loss_fn=next_token_loss)
        query = est.featurize_loader(loader=query_batches, loss_fn=next_token_loss)
        est.close()
        train_flat = torch.cat(list(train.phi.values()), dim=-1).sum(dim=1)
        query_flat = torch.cat(list(query.phi.values()), dim=-1)
        columns = [slice(k * m, (k + 1) * m) for k in range(len(train.phi))]
        errors = SketchErrors(query_flat, columns, m)
        sdi_se, tracin_se = errors(train_flat, train_chunk=3, query_chunk=2)
        if seed == 0:  # chunking bounds temporaries only; the block order does not matter
            torch.testing.assert_close(
                (sdi_se, tracin_se), standard_errors(train_flat, query_flat, columns[::-1], m)
            )
            summed = standard_errors(train_flat, query_flat.sum(1, keepdim=True), columns, m)
            torch.testing.assert_close(summed[1], tracin_se)  # TracIn alone, as in mode="tracin"
        sdi_runs.append(torch.einsum("id,jsd->ijs", train_flat, query_flat))
        tracin_runs.append(sdi_runs[-1].sum(-1))
        sdi_var.append(sdi_se.square())
        tracin_var.append(tracin_se.square())
    for runs, var in ((sdi_runs, sdi_var), (tracin_runs, tracin_var)):
        spread = torch.stack(runs).std(dim=0)
        predicted = torch.stack(var).mean(dim=0).sqrt()
        ratio = (predicted / spread).mean().item()
        assert 0.75 < ratio < 1.25, ratio
