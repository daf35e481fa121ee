"""Pair-level explanations of SDI: where in the sequences and through which weights.

For a selected module used at step ``s`` on an example with positions ``p = 0..T-1``, the per-use
gradient splits by output position, ``phi_s = sum_p phi_{s,p}``, with ``phi_{s,p}`` the contribution
of the grad-output at position ``p`` (Linear weight ``g_p a_p^T``, bias ``g_p``, Embedding
``onehot(id_p) g_p^T``, any other rule: its vjp with the grad-output masked to ``p``). Every rule is
linear in the grad-output, so ``phi_{s,p}`` is the rule's feature of the grad-output masked to ``p``
-- the real backward pass is left alone; only what the rules see is masked. For one pair
``(i, j)`` and checkpoint weights ``eta_k``:

- ``positions_train[p, t] = sum_k eta_k <sum_s phi_{s,p}(train i), phi_t(query j)>``  ``(T_i, S_q)``
- ``positions_query[p, t] = sum_k eta_k <sum_s phi_s(train i), phi_{t,p}(query j)>``  ``(T_j, S_q)``
- ``by_parameter[g, t]``: the pair's SDI restricted to group ``g``'s columns (:mod:`sdi.parameter_groups`)

Each sums over its first axis to the pair's SDI ``(S_q,)`` (to float rounding, sketched or exact).

Cost: only the batches holding an explained example are featurised, each ``1 + T`` times (once as
it is, once per position with the mask), and each per-position feature is contracted with the
paired example's feature as soon as it is computed and dropped, so memory is ``O(pairs x D)`` beyond
one batch's features -- never ``(k, T, steps, m)``. The ``T`` masked passes are the simple, exact way
for every rule; Linear / Embedding / bias rules could do it in one pass.

Batches are counted without running the model, but for the first batch of the call: the examples
of a batch lie along one dimension of its first tensor (a tensor, or the first tensor found in a
dict / list / tuple) -- the one whose size equals the batch the model saw in the first batch, as
a sequence-first model (``batch_first=False``) may take batch-first inputs. The featurised row
count of every featurised batch is checked against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint_into
from .featurize import Featurizer
from .options import RunOptions
from .outputs import PairExplanation
from .parameter_groups import parameter_groups


class _MaskedRules:
    """The featurizer's rules, shown every use's grad-output masked to one position
    (``position=None``: unmasked), recording the position lengths they see."""

    step_sums = None  # no per-pass accumulator: every use's own features are masked

    def __init__(self, rules, position: int | None):
        self._rules, self.position, self.lengths = rules, position, set()

    def __getattr__(self, name: str):
        return getattr(self._rules, name)

    def shown_grad(self, g: torch.Tensor, pos: int | None) -> torch.Tensor:
        """``g`` (batch first) masked to the position on its dimension ``pos``, which the data flow
        established (:mod:`sdi.positions`)."""
        if pos is None:
            raise ValueError(
                f"a selected use's output (grad shape {tuple(g.shape)}, batch first) has no "
                "position dimension that the data flow establishes: explain splits grad-outputs "
                "by position. Keep the positions a dimension of their own up to the selected "
                "modules (not summed over, nor merged with another dimension), or use "
                "by_parameter= of influence_across_checkpoints for the split by weights alone"
            )
        self.lengths.add(g.shape[pos])
        if self.position is None:
            return g
        masked = torch.zeros_like(g)
        at = (slice(None),) * pos + (self.position,)
        masked[at] = g[at]
        return masked


@contextmanager
def _rules_shown(featurizer: Featurizer, rules: _MaskedRules):
    saved = featurizer.rules
    featurizer.rules = rules
    try:
        yield rules
    finally:
        featurizer.rules = saved


def _featurize(featurizer, batch, loss_fn, sum_steps: bool, position: int | None, size: int):
    """One batch's features with the grad-output masked to ``position``, and the position count."""
    with _rules_shown(featurizer, _MaskedRules(featurizer.rules, position)) as rules:
        feats, _ = featurizer.compute_batch(batch, loss_fn, sum_steps=sum_steps)
    if feats.shape[0] != size:
        raise ValueError(
            f"a batch's first tensor counts {size} examples but the model saw {feats.shape[0]}: "
            "explain counts examples along one dimension of each batch's first tensor, learnt from "
            "the first batch; give every batch the same layout"
        )
    if len(rules.lengths) != 1:
        raise ValueError(
            f"the selected modules' outputs have different position counts {sorted(rules.lengths)}: "
            "explain splits by position, so select modules that all see the same positions"
        )
    return feats, rules.lengths.pop()


def _first_tensor(batch: Any) -> torch.Tensor | None:
    """A batch's first tensor: itself, or the first found in a dict / list / tuple (depth first)."""
    if torch.is_tensor(batch):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping | list | tuple):
        for item in batch.values() if isinstance(batch, Mapping) else batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class _ExampleCounter:
    """How many examples a batch holds, without running the model: a dimension of its first
    tensor, learnt once per call from the first batch featurised.

    The model's batch (what the selected modules saw, ``batch_first`` or not) need not be the
    loader's: a sequence-first model (``batch_first=False``) often takes batch-first token ids
    ``(B, T)`` and transposes them itself. The dimension of the first tensor whose size equals the
    model's batch is used from then on -- ``batch_first``'s dimension when both fit.
    """

    def __init__(self, featurizer: Featurizer, loss_fn, batch_dim: int):
        self.featurizer, self.loss_fn, self.batch_dim = featurizer, loss_fn, batch_dim
        self.dim: int | None = None

    def __call__(self, batch: Any, name: str) -> int:
        first = _first_tensor(batch)
        if first is None:
            raise TypeError(
                f"explain cannot count the examples of a {name} batch: it holds no tensor with a "
                "batch dimension. Put a tensor of the examples first in each batch."
            )
        if self.dim is None:
            seen = self.featurizer.compute_batch(batch, self.loss_fn, sum_steps=True)[0].shape[0]
            fits = [d for d in (self.batch_dim, 1 - self.batch_dim) if d < first.dim()]
            fits = [d for d in fits if first.shape[d] == seen]
            if not fits:
                raise ValueError(
                    f"explain counts a batch's examples along a dimension of its first tensor, "
                    f"shape {tuple(first.shape)}, but the model saw a batch of {seen} examples "
                    f"(batch_first={self.featurizer.batch_first}): put a tensor with the examples "
                    "along dimension 0 first in each batch of the loaders."
                )
            self.dim = fits[0]
        if first.dim() <= self.dim:
            raise ValueError(
                f"a {name} batch's first tensor has shape {tuple(first.shape)}, but the first batch "
                f"counted examples along dimension {self.dim}: give every batch the same layout"
            )
        return int(first.shape[self.dim])


def _batches_with(
    loader: Iterable[Any], wanted: set[int], count: _ExampleCounter, name: str
) -> Iterator[tuple[Any, int, int]]:
    """``(batch, first row, size)`` of each batch of ``loader`` holding a row in ``wanted``,
    stopping after the last; raises naming ``name`` for a row the loader does not have."""
    last, start = max(wanted), 0
    for batch in loader:
        size = count(batch, name)
        if any(start <= r < start + size for r in wanted):
            yield batch, start, size
        start += size
        if start > last:
            return
    raise IndexError(f"{name} has {start} rows; explain asked for row {last}")


def _checkpoint_weights(featurizer: Featurizer, options: RunOptions) -> Iterator[float]:
    """Load each checkpoint into the model (eval mode) and yield its weight; restore train mode."""
    model, was_training = featurizer.model, featurizer.model.training
    try:
        for k, spec in enumerate(
            tqdm(options.checkpoints, desc=options.progress_desc, disable=not options.progress)
        ):
            yield load_checkpoint_into(
                model,
                spec,
                options.load_checkpoint_fn,
                options.load_model_state_dict_fn,
                options.eta_from_checkpoint_fn,
                index=k,
            )
    finally:
        model.train(was_training)


def _pairs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for pair in pairs:
        if (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)
        ):
            raise ValueError(
                f"pairs must be (train row, query row) pairs of ints >= 0, got {pair!r}"
            )
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ValueError("pairs is empty")
    return out


def explain(
    featurizer: Featurizer,
    options: RunOptions,
    pairs: Sequence[tuple[int, int]],
) -> list[PairExplanation]:
    """The stage behind :meth:`sdi.estimators.ProjectedTracInSDI.explain`: one
    :class:`PairExplanation` per ``(train row, query row)`` of ``pairs``, in order.

    ``options.by_parameter`` (``True`` or ``{group: regex}``) names the groups of ``by_parameter``.
    """
    pairs = _pairs(pairs)
    groups = parameter_groups(featurizer.blocks, options.by_parameter)
    loss_fn = options.loss_fn
    count = _ExampleCounter(featurizer, loss_fn, 0 if featurizer.batch_first else 1)
    totals: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def add(pair, key, value):
        held = totals.setdefault(pair, {})
        if key in held and held[key].shape != value.shape:
            raise ValueError(
                f"pair {pair}: {key} has shape {tuple(value.shape)} at this checkpoint but "
                f"{tuple(held[key].shape)} before: the loaders must yield the same examples"
            )
        held[key] = held[key] + value if key in held else value

    train_rows = {i for i, _ in pairs}
    query_rows = {j for _, j in pairs}
    for weight in _checkpoint_weights(featurizer, options):
        # Query features per step, then train features summed over steps: the pairs' partners.
        query, query_length = {}, {}
        for batch, start, size in _batches_with(
            options.query_loader, query_rows, count, "query_loader"
        ):
            feats, length = _featurize(featurizer, batch, loss_fn, False, None, size)
            for j in query_rows & set(range(start, start + size)):
                query[j], query_length[j] = feats[j - start].clone(), length
        train = {}
        for batch, start, size in _batches_with(
            options.train_loader, train_rows, count, "train_loader"
        ):
            feats, length = _featurize(featurizer, batch, loss_fn, True, None, size)
            rows = train_rows & set(range(start, start + size))
            for i in rows:
                train[i] = feats[i - start].clone()
            # Train side by position: each masked feature meets its paired queries and is dropped.
            split = {
                pair: torch.zeros(length, query[pair[1]].shape[0])
                for pair in pairs
                if pair[0] in rows
            }
            for p in range(length):
                masked, _ = _featurize(featurizer, batch, loss_fn, True, p, size)
                for (i, j), out in split.items():
                    out[p] = (query[j] @ masked[i - start]).cpu()
            for pair, out in split.items():
                add(pair, "positions_train", weight * out)
        # Query side by position, against the train examples' full gradients.
        for batch, start, size in _batches_with(
            options.query_loader, query_rows, count, "query_loader"
        ):
            rows = query_rows & set(range(start, start + size))
            length = query_length[next(iter(rows))]
            split = {
                pair: torch.zeros(length, query[pair[1]].shape[0])
                for pair in pairs
                if pair[1] in rows
            }
            for p in range(length):
                masked, _ = _featurize(featurizer, batch, loss_fn, False, p, size)
                for (i, j), out in split.items():
                    out[p] = (masked[j - start] @ train[i]).cpu()
            for pair, out in split.items():
                add(pair, "positions_query", weight * out)
        for i, j in dict.fromkeys(pairs):  # each distinct pair once
            q, g = query[j], train[i]
            add((i, j), "sdi", weight * (q @ g).cpu())
            shares = torch.stack([grp.select(q) @ grp.select(g) for grp in groups]).cpu()
            add((i, j), "by_parameter", weight * shares)
    names = tuple(g.name for g in groups)
    return [PairExplanation(train=i, query=j, groups=names, **totals[(i, j)]) for i, j in pairs]
