"""Contractions of train and query features into influence scores.

Features are flat fp32 tensors whose last dimension ``D`` concatenates every selected parameter, so
``sum_p <x_p, y_p>`` is one inner product. With ``g_i = sum_s phi_s(train i)``:

- ``sdi[i, j, t]      = <g_i, phi_t(query j)>``                  (N_train, N_query, steps_q)
- ``tracin[i, j]      = <g_i, sum_t phi_t(query j)>``            (N_train, N_query)
- ``matrix[i, j, s, t] = <phi_s(train i), phi_t(query j)>``      (N_train, N_query, steps_tr, steps_q)

Each takes optional chunk sizes that bound the temporaries of one matmul.
"""

from __future__ import annotations

import torch

from .chunking import spans


def query_sdi(
    train_sum: torch.Tensor,
    query: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train_sum (n, D)``, ``query (N_q, S_q, D)`` -> ``(n, N_q, S_q)``."""
    n, (nq, sq, _) = train_sum.shape[0], query.shape
    out = torch.empty(n, nq, sq, dtype=torch.float32, device=query.device)
    for i0, i1 in spans(n, train_chunk):
        for j0, j1 in spans(nq, query_chunk):
            q = query[j0:j1].reshape(-1, query.shape[-1])
            out[i0:i1, j0:j1] = (train_sum[i0:i1] @ q.T).view(i1 - i0, j1 - j0, sq)
    return out


def tracin(
    train_sum: torch.Tensor,
    query_sum: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train_sum (n, D)``, ``query_sum (N_q, D)`` -> ``(n, N_q)``."""
    out = torch.empty(
        train_sum.shape[0], query_sum.shape[0], dtype=torch.float32, device=query_sum.device
    )
    for i0, i1 in spans(train_sum.shape[0], train_chunk):
        for j0, j1 in spans(query_sum.shape[0], query_chunk):
            out[i0:i1, j0:j1] = train_sum[i0:i1] @ query_sum[j0:j1].T
    return out


def step_matrix(
    train: torch.Tensor,
    query: torch.Tensor,
    train_chunk: int | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``train (n, S_tr, D)``, ``query (N_q, S_q, D)`` -> ``(n, N_q, S_tr, S_q)``."""
    (n, st, d), (nq, sq, _) = train.shape, query.shape
    out = torch.empty(n, nq, st, sq, dtype=torch.float32, device=query.device)
    for i0, i1 in spans(n, train_chunk):
        for j0, j1 in spans(nq, query_chunk):
            prod = train[i0:i1].reshape(-1, d) @ query[j0:j1].reshape(-1, d).T
            out[i0:i1, j0:j1] = prod.view(i1 - i0, st, j1 - j0, sq).permute(0, 2, 1, 3)
    return out
