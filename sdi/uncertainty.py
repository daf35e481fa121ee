"""Per-score standard errors of sketched SDI and TracIn, estimated from the sketches alone.

A projected score is a sum over the selected parameters ``p`` of ``X_p = <S_p x, S_p y>``, where
``S_p`` is the CountSketch (1-D parameters) or TensorSketch (matrices) of parameter ``p`` into
``m`` buckets and ``x``, ``y`` are that parameter's train and query gradients. Different parameters
have independent tables, so ``Var(sum_p X_p) = sum_p Var(X_p)``. This module estimates each
``Var(X_p)`` from the two ``m``-vectors ``S_p x``, ``S_p y`` alone.

Derivation. Write ``F_f(v) = sum_k v[k] w^(f k)``, ``w = exp(-2 pi i / m)``, for the DFT of a
sketch. By Parseval, ``X = (1/m) sum_{f=0}^{m-1} P_f`` with ``P_f = F_f(Sx) conj(F_f(Sy))``.

- CountSketch: ``F_f(Sx) = sum_i s(i) x_i w^(f h(i))``.
- TensorSketch: by the convolution theorem ``F_f(TS phi) = a_f^T phi b_f`` with independent
  ``a_f[i] = s_out(i) w^(f h_out(i))`` and ``b_f[j] = s_in(j) w^(f h_in(j))``.

Take ``R_f = Re(P_f)`` at the ``F = (m - 1) // 2`` frequencies ``1 <= f <= F`` (``P_{m-f}`` is
the conjugate of ``P_f``; ``P_0`` and, for even ``m``, ``P_{m/2}`` are real). Expanded over the
signs, every cross term of ``R_f`` carries ``cos(f D)`` with ``D`` a difference (TensorSketch: a sum
or difference of two differences) of independent uniform hash values on ``Z_m``. Since
``0 < f + f' < m``, for ``1 <= f != f' <= F``:

- ``E[R_f] = <x, y>``: every frequency is an unbiased estimate on its own;
- ``Cov(R_f, R_f') = 0`` and ``Var(R_f)`` is the same at every ``f`` (``E[cos^2(f D)] = 1/2``);
- for CountSketch ``Var(P_0) = Var(P_{m/2}) = 2 Var(R_f)``, and ``P_0`` is uncorrelated with the
  ``R_f``, so

      Var(X) = (Var P_0 + Var P_{m/2} + 4 F Var(R_f)) / m^2 = 2 Var(R_f) / m,

  the textbook ``(||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / m``.

So the sample variance of ``R_1, ..., R_F`` estimates ``Var(R_f)`` without bias from one draw of
the tables, and

    Var_hat(X) = (2 / m) * (sum_f R_f^2 - (sum_f R_f)^2 / F) / (F - 1)

is exactly unbiased for CountSketch. For TensorSketch only ``P_0`` and ``P_{m/2}`` break the
pattern (there ``a_f``, ``b_f`` are real, so cross terms that vanish at other frequencies
survive): a relative bias of order ``1/m``. Enumerating every table of 2 x 2 matrices gives +5 to
+11 % at ``m = 8`` and +3 to +5 % at ``m = 16`` (``tests/test_uncertainty.py``).

The estimate needs neither the sketch type nor the unsketched gradients. That matters for
TensorSketch, whose variance over entries ``a != b`` of the ``(d_out, d_in)`` matrices is

    m Var(X) = sum_{a != b} (phi_a^2 psi_b^2 + phi_a psi_a phi_b psi_b)      (CountSketch's)
             + sum_{i != i', j != l} phi_ij psi_il (phi_i'j psi_i'l + phi_i'l psi_i'j)
             + sum_{j != j', i != k} phi_ij psi_kj (phi_ij' psi_kj' + phi_kj' psi_ij') + O(1/m):

two entries in one row (column) collide whenever their column (row) hashes do, so the extra sums
are ``||phi^T psi||^2 + tr((phi^T psi)^2)`` and ``||phi psi^T||^2 + tr((phi psi^T)^2)`` less
their ``i = i'`` (``j = j'``) parts. They cancel for unstructured matrices but not for low-rank
gradients (a few tokens' ``g a^T``): for aligned rank-one gradients they triple the variance, so the
CountSketch formula fed with sketch norms would understate TensorSketch errors.

Every term is a matmul over features: with ``A = F(Sx)``, ``B = F(Sy)`` at ``f = 1..F``,
``sum_f R_f = [A_re, A_im] . [B_re, B_im]`` and
``sum_f R_f^2 = [A_re^2, A_im^2, 2 A_re A_im] . [B_re^2, B_im^2, B_re B_im]``. The standard error
estimate itself has a relative spread of about ``1 / sqrt(2 F)`` (more for heavy-tailed ``R_f``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .chunking import tiles


class _Spectra:
    """Per-frequency statistics of flat sketched features ``(N, D)`` for ``f = 1..F``.

    ``lin (P, N, 2F)``: ``[Re, Im]`` of each parameter block's spectrum.
    ``sq (N, P * 3F)``: ``[Re^2, Im^2, c * Re * Im]`` of every block, concatenated (``c = 2`` on the
    train side, ``1`` on the query side, so that their product is ``sum_f R_f^2``).
    """

    def __init__(self, features: torch.Tensor, columns: Sequence[slice], m: int, cross: float):
        freqs = (m - 1) // 2
        first, n = columns[0].start, len(columns)
        if all(c.start == first + k * m for k, c in enumerate(columns)):  # the usual tiled layout
            blocks = features[:, first : first + n * m].reshape(-1, n, m).transpose(0, 1)
        else:
            blocks = torch.stack([features[:, c] for c in columns], dim=0)
        blocks = blocks.to(torch.float32)
        spec = torch.fft.rfft(blocks, n=m, dim=-1)[..., 1 : freqs + 1]  # (P, N, F)
        re, im = spec.real, spec.imag
        self.lin = torch.cat([re, im], dim=-1)
        sq = torch.cat([re * re, im * im, cross * re * im], dim=-1)  # (P, N, 3F)
        self.sq = sq.permute(1, 0, 2).reshape(features.shape[0], -1)


class SketchErrors:
    """Standard errors of projected SDI and TracIn against one set of query features.

    Build it once per checkpoint from the query features (their spectra are computed here), then
    call it once per train batch, like :func:`sdi.influence.query_sdi`. For TracIn alone pass the
    query features summed over steps as ``(N_q, 1, D)``.

    Args:
        query: per-step query features ``(N_q, S_q, D)``, the flat layout of
            :mod:`sdi.featurize` (fp32 sketches).
        columns: the column slice of every selected parameter, each ``m`` wide.
        m: the sketch size (``projection_size``); needs ``m >= 5``.
    """

    def __init__(self, query: torch.Tensor, columns: Sequence[slice], m: int):
        if query.dim() != 3:
            raise ValueError(f"query must be (N_q, S_q, D), got shape {tuple(query.shape)}")
        columns = list(columns)
        if not columns:
            raise ValueError("no column slices given")
        widths = {c.stop - c.start for c in columns}
        if widths != {m} or any(c.step not in (None, 1) for c in columns):
            raise ValueError(f"every column slice must be {m} contiguous columns, got {columns}")
        self.freqs = (m - 1) // 2
        if self.freqs < 2:
            raise ValueError(f"standard errors need m >= 5 (two frequencies), got m={m}")
        self.m, self.columns = int(m), columns
        self.n_query, self.steps = query.shape[0], query.shape[1]
        self._steps = _Spectra(query.reshape(-1, query.shape[-1]), columns, m, cross=1.0)
        # One step (e.g. query features already summed, as in mode="tracin"): TracIn is that step.
        self._total = (
            self._steps if self.steps == 1 else _Spectra(query.sum(dim=1), columns, m, cross=1.0)
        )

    def __call__(
        self,
        train_sum: torch.Tensor,
        train_chunk: int | None = None,
        query_chunk: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard errors for one batch of train features.

        Args:
            train_sum: train features summed over steps ``(n, D)``.
            train_chunk, query_chunk: bound the temporaries, as in :mod:`sdi.influence`.

        Returns:
            ``(sdi_se (n, N_q, S_q), tracin_se (n, N_q))``: the estimated standard deviation, over
            the draw of the hash tables, of each projected score at this checkpoint.
        """
        train = _Spectra(train_sum, self.columns, self.m, cross=2.0)
        step_rows = query_chunk * self.steps if query_chunk else None  # rows of (N_q * S_q)
        sdi_se = self._variance(train, self._steps, train_chunk, step_rows).sqrt_()
        sdi_se = sdi_se.view(train_sum.shape[0], self.n_query, self.steps)
        if self.steps == 1:
            return sdi_se, sdi_se[..., 0].clone()
        tracin_se = self._variance(train, self._total, train_chunk, query_chunk).sqrt_()
        return sdi_se, tracin_se

    def _variance(self, train: _Spectra, query: _Spectra, train_chunk, query_chunk) -> torch.Tensor:
        """``sum_p Var_hat(X_p)`` for every (train row, query row): ``(n, N_query_rows)``."""
        n, nq = train.sq.shape[0], query.sq.shape[0]
        F = self.freqs
        out = torch.empty(n, nq, dtype=torch.float32, device=train.sq.device)
        for i, j in tiles(n, nq, train_chunk, query_chunk):
            sum_sq = train.sq[i] @ query.sq[j].T
            sums = torch.bmm(train.lin[:, i], query.lin[:, j].transpose(1, 2))
            spread = sum_sq - sums.square().sum(dim=0) / F
            # A sample variance is never negative; rounding can make a tiny one so.
            out[i, j] = spread.clamp_(min=0).mul_(2.0 / (self.m * (F - 1)))
        return out


def standard_errors(
    train_sum: torch.Tensor, query: torch.Tensor, columns: Sequence[slice], m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot form of :class:`SketchErrors`.

    ``train_sum (n, D)``, ``query (N_q, S_q, D)``, the parameters' column slices and ``m`` ->
    ``(sdi_se (n, N_q, S_q), tracin_se (n, N_q))``.
    """
    return SketchErrors(query, columns, m)(train_sum)
