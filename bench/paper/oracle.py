"""Exact SDI and TracIn of the paper model by plain autograd, independent of ``sdi``.

Every use of the looped body gets its own parameter copies: the loop is unrolled and loop step
``t`` runs the recurrent blocks with leaves ``p.detach().requires_grad_()`` of its own (views of
the one weight, so no memory is copied), so autograd returns the per-step gradient ``phi_t(j)`` of
each copy. Memory is streamed so the paper scale fits in a few GB:

1. the full per-example gradient ``G_i`` over the body (~28M parameters, ~113 MB in fp32) of each
   sequence, by plain autograd on that sequence alone (batch of one);
2. per query ``j`` (batch of one), one backward of the unrolled loop; as each copy's gradient
   ``phi_t(j)`` lands, a post-accumulate hook contracts it with every ``G_i`` into
   ``SDI[i, j, t] = <G_i, phi_t(j)>`` (float64 sums of fp32 dot products) and frees it, and adds it to
   ``sum_t phi_t(j)``, checked against ``G_j`` from step 1.

``TracIn[i, j] = <G_i, G_j>``. Only ``model.embed`` / ``start`` / ``inject`` / ``readout`` and the
blocks' ``forward`` are used (through ``torch.func.functional_call``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call


@dataclass
class ExactInfluence:
    sdi: torch.Tensor  # (N, N, steps) float64: train i, query j, step t
    tracin: torch.Tensor  # (N, N) float64
    consistency: (
        float  # max_j ||sum_t phi_t(j) - G_j|| / ||G_j||: per-step copies vs plain autograd
    )


def _body_params(model) -> list[dict[str, torch.nn.Parameter]]:
    return [dict(block.named_parameters()) for block in model.recurrent]


def full_gradients(model, tokens: torch.Tensor, loss_fn) -> list[list[torch.Tensor]]:
    """Per sequence, its loss gradient over every recurrent-block parameter (block order, then
    ``named_parameters`` order), by plain autograd on that sequence alone."""
    params = [p for block in _body_params(model) for p in block.values()]
    out = []
    for i in range(tokens.shape[0]):
        loss = loss_fn(model, {"tokens": tokens[i : i + 1]}).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def _unrolled_loss(model, tokens: torch.Tensor, copies) -> torch.Tensor:
    """The model's loss with step ``t``'s recurrent blocks run on ``copies[t]``."""
    e = model.embed(tokens)
    state = model.start(e)
    for step_copies in copies:
        state = model.inject(state, e)
        for block, params in zip(model.recurrent, step_copies, strict=True):
            state = functional_call(block, params, (state,))
    return model.readout(state)


def exact_influence(model, tokens: torch.Tensor, loss_fn, progress=None) -> ExactInfluence:
    """Exact SDI ``(N, N, steps)`` and TracIn ``(N, N)`` of the sequences ``tokens (N, T)`` as both
    train and query set; ``loss_fn(model, {"tokens": (1, T)})`` returns a per-sequence loss ``(1,)``.
    The model is used as it is (eval mode; parameters' ``requires_grad`` restored)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():  # only the body's gradients are wanted
            p.requires_grad_(False)
        for block in model.recurrent:
            for p in block.parameters():
                p.requires_grad_(True)
        grads = full_gradients(model, tokens, loss_fn)
        if progress is not None:
            progress("oracle: full per-example gradients done")
        for p in model.recurrent.parameters():
            p.requires_grad_(False)  # the copies are the leaves now
        n, steps = tokens.shape[0], model.loop_steps
        sdi = torch.zeros(n, n, steps, dtype=torch.float64)
        worst = 0.0
        for j in range(n):
            sums = [torch.zeros_like(g) for g in grads[j]]
            copies = []
            for t in range(steps):
                step_copies, k = [], 0
                for block in _body_params(model):
                    leaves = {}
                    for name, p in block.items():
                        leaf = p.detach().requires_grad_(True)
                        leaf.register_post_accumulate_grad_hook(
                            _contract(sdi, grads, sums, j, t, k)
                        )
                        leaves[name], k = leaf, k + 1
                    step_copies.append(leaves)
                copies.append(step_copies)
            loss = _unrolled_loss(model, tokens[j : j + 1], copies)
            loss = _loss_of_logits(loss, tokens[j : j + 1])
            loss.backward()
            del copies
            diff = sum(
                float((s - g).double().square().sum()) for s, g in zip(sums, grads[j], strict=True)
            )
            norm = sum(float(g.double().square().sum()) for g in grads[j])
            worst = max(worst, (diff / norm) ** 0.5)
            if progress is not None:
                progress(f"oracle: per-step gradients of sequence {j + 1}/{n} done")
        flat = [torch.cat([g.flatten() for g in gi]) for gi in grads]
        tracin = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                tracin[i, j] = float(torch.dot(flat[i].double(), flat[j].double()))
        return ExactInfluence(sdi, tracin, worst)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def _loss_of_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The per-sequence mean next-token cross-entropy of ``model.next_token_loss``, summed."""
    targets = tokens[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return per_token.view(targets.shape).mean(dim=1).sum()


def _contract(sdi, grads, sums, j: int, t: int, k: int):
    """The hook of copy ``k`` (parameter ``k`` of the body) at step ``t`` for query ``j``."""

    def hook(leaf: torch.Tensor) -> None:
        phi = leaf.grad
        for i, gi in enumerate(grads):
            sdi[i, j, t] += float(torch.dot(gi[k].flatten(), phi.flatten()))
        sums[k] += phi
        leaf.grad = None  # one copy's gradient alive at a time

    return hook
