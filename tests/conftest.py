"""Shared fixtures: a tiny looped transformer, loaders, checkpoints, and torch.func ground truth."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from sdi import CheckpointSpec, FullGradientTracInSDI, ProjectedTracInSDI
from sdi.sketch import sketch_matrix_explicit
from sdi.toy import LoopedTransformer, next_token_loss, random_token_batches

VOCAB, SEQ = 19, 7


def tiny_model(seed: int = 0, steps: int = 3, norm_affine: bool = True) -> LoopedTransformer:
    torch.manual_seed(seed)
    model = LoopedTransformer(
        vocab=VOCAB, d_model=12, n_heads=2, loop_steps=steps, max_len=SEQ, norm_affine=norm_affine
    )
    with torch.no_grad():  # non-trivial norm parameters, so their gradients are not symmetric
        for p in model.core.norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture
def model() -> LoopedTransformer:
    return tiny_model()


@pytest.fixture
def train_batches():
    return random_token_batches(7, 3, SEQ, VOCAB, seed=11)  # 7 examples: a ragged last batch


@pytest.fixture
def query_batches():
    return random_token_batches(4, 4, SEQ, VOCAB, seed=12)


def save_checkpoint(path, model, lr=None) -> str:
    ckpt = {"model_state_dict": model.state_dict()}
    if lr is not None:
        ckpt["optimizer_state_dict"] = {"param_groups": [{"lr": lr}], "state": {}}
    torch.save(ckpt, path)
    return str(path)


def stacked(batches) -> torch.Tensor:
    return torch.cat([b["tokens"] for b in batches])


def per_use_grads(model: LoopedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example, per-loop-step gradients of the core's parameters, by torch.func.

    The loop is unrolled with an independent copy of the core's parameters for every step, so the
    gradient w.r.t. copy ``t`` is exactly the gradient of use ``t``. Returns ``(N, steps, P)`` with
    parameters in ``model.core.named_parameters()`` order, flattened.
    """
    core = {k: v.detach() for k, v in model.core.named_parameters()}
    names = list(core)
    copies = [dict(core) for _ in range(model.loop_steps)]

    def loss_one(copies, toks):
        toks = toks[None]
        x = model.embed(toks) + model.pos[: toks.shape[1]]
        for params in copies:
            x = functional_call(model.core, params, (x,))
        logits = model.head(x)[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1)
        )

    grads = vmap(grad(loss_one), in_dims=(None, 0))(copies, tokens)
    return torch.stack(
        [torch.cat([g[k].reshape(tokens.shape[0], -1) for k in names], 1) for g in grads], 1
    )


def full_grads(model: LoopedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of the core's parameters through the tied loop, by torch.func: ``(N, P)``."""
    core = {k: v.detach() for k, v in model.core.named_parameters()}
    names = list(core)

    def loss_one(params, toks):
        full = {f"core.{k}": v for k, v in params.items()}
        return next_token_loss(_Bound(model, full), {"tokens": toks[None]})[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0))(core, tokens)
    return torch.cat([grads[k].reshape(tokens.shape[0], -1) for k in names], 1)


class _Bound(torch.nn.Module):
    """``model`` called with some parameters replaced (for torch.func)."""

    def __init__(self, model, params):
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, tokens):
        return functional_call(self.inner, self.params, (tokens,), strict=False)


# Shared by the estimator-level tests of several modules.


def run_influence(est, path, train, query, **kw):
    """``influence_across_checkpoints`` of one checkpoint file (its weight read from the file: 1.0
    unless it stores a learning rate) or of a list of specs; ``loss_fn`` is next-token loss unless
    given."""
    return est.influence_across_checkpoints(
        checkpoints=[CheckpointSpec(path)] if isinstance(path, str) else path,
        train_loader=train,
        query_loader=query,
        loss_fn=kw.pop("loss_fn", next_token_loss),
        **kw,
    )


def sketched(model, **kw):
    """The projected estimator of ``model.core`` that the streaming and store tests use."""
    return ProjectedTracInSDI(
        model=model, target_modules=model.core, projection_size=48, seed=5, **kw
    )


def two_checkpoints(tmp_path, weight_a: float, weight_b: float):
    """Two tiny models (seeds 1, 2), saved as ``a.pt`` and ``b.pt``, and their specs."""
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    specs = [
        CheckpointSpec(save_checkpoint(tmp_path / "a.pt", a), weight_a),
        CheckpointSpec(save_checkpoint(tmp_path / "b.pt", b), weight_b),
    ]
    return a, b, specs


ESTIMATORS = [
    pytest.param(lambda **kw: ProjectedTracInSDI(projection_size=64, seed=1, **kw), id="projected"),
    pytest.param(lambda **kw: FullGradientTracInSDI(**kw), id="exact"),
]


def linear_inputs(d_out, d_in, B, T, seed, dtype=torch.float32):
    """Random activations ``(B, T, d_in)`` and grad-outputs ``(B, T, d_out)`` of one Linear use."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d_in, generator=gen).to(dtype)
    g = torch.randn(B, T, d_out, generator=gen).to(dtype)
    return a, g


def explicit_linear_sketch(a, g, table):
    """The sketch of the explicit gradient ``G^T A`` of one Linear use (DESIGN §2, identity 1)."""
    return sketch_matrix_explicit(torch.einsum("bto,bti->boi", g.float(), a.float()), table)


class DiesAfter:
    """A re-iterable loader whose every pass yields the first ``n`` of ``batches``, then raises
    ``error`` (an interrupted run: sdi refuses one-shot generators as loaders)."""

    def __init__(self, batches, n: int, error: type[BaseException]):
        self.batches, self.n, self.error = batches, n, error

    def __iter__(self):
        yield from self.batches[: self.n]
        raise self.error
