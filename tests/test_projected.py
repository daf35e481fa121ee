"""Identity 4 of DESIGN §2: projected estimates are unbiased and their error shrinks like 1/sqrt(m)."""

from __future__ import annotations

import torch
from conftest import full_grads, per_use_grads, stacked, tiny_model

from sdi import ProjectedTracInSDI
from sdi.toy import next_token_loss, random_token_batches


def _sdi(model, m, seed, train, query):
    est = ProjectedTracInSDI(model=model, target_modules=model.core, projection_size=m, seed=seed)
    tr = est.featurize_loader(loader=train, loss_fn=next_token_loss)
    q = est.featurize_loader(loader=query, loss_fn=next_token_loss)
    est.close()
    flat = lambda f: torch.cat([v for v in f.phi.values()], dim=2)  # noqa: E731
    return torch.einsum("isd,jtd->ijt", flat(tr), flat(q))


def _setup():
    model = tiny_model(seed=4, steps=2)
    train = random_token_batches(4, 4, 7, 19, seed=1)
    query = random_token_batches(2, 2, 7, 19, seed=2)
    exact = torch.einsum(
        "id,jtd->ijt", full_grads(model, stacked(train)), per_use_grads(model, stacked(query))
    )
    return model, train, query, exact


def test_mean_over_seeds_converges_to_exact_sdi():
    model, train, query, exact = _setup()
    runs = torch.stack([_sdi(model, 32, seed, train, query) for seed in range(96)])
    one_run_error = ((runs - exact).flatten(1).norm(dim=1) / exact.norm()).mean()
    mean_error = (runs.mean(0) - exact).norm() / exact.norm()
    # Averaging 96 independent unbiased estimates shrinks the error by ~sqrt(96) ≈ 9.8.
    assert mean_error < one_run_error / 4, (mean_error, one_run_error)


def test_error_shrinks_like_inverse_sqrt_m():
    model, train, query, exact = _setup()

    def error(m):
        return torch.stack(
            [
                (_sdi(model, m, seed, train, query) - exact).norm() / exact.norm()
                for seed in range(12)
            ]
        ).mean()

    small, large = error(64), error(1024)
    # 16x more buckets: ~4x less error expected; allow for the spread of 12 seeds.
    assert 2.5 < small / large < 7, (small, large)
