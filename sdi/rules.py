"""Per-layer rules: the feature of one use of a module, for each of its selected parameters.

Given a use's activations and grad-output (batch first, already scaled to per-example losses), a rule
returns one ``(B, D)`` fp32 feature per parameter:

- :class:`SketchRules` (projected estimator): ``nn.Linear.weight`` and ``nn.Embedding.weight`` by
  TensorSketch, ``nn.Linear.bias`` by CountSketch of the token-summed grad-output, any other 1-D
  parameter by CountSketch of its Opacus per-sample gradient. ``D = projection_size``.
- :class:`ExactRules` (full-gradient baseline): the per-example, per-use gradient itself, flattened.
  ``D = param.numel()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
from opacus.grad_sample.grad_sample_module import GradSampleModule

from .backend import SketchBackend
from .sketch import CountSketchHash, TensorSketchHash, draw_count_sketch, draw_tensor_sketch


def _where(param_name: str, module_name: str, module: nn.Module) -> str:
    return (
        f"parameter {param_name!r} of module {module_name or '<model>'!r} ({type(module).__name__})"
    )


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, ..., d)`` -> ``(B, T, d)``, every middle dimension counted as tokens."""
    return x.unsqueeze(1) if x.dim() == 2 else x.reshape(x.shape[0], -1, x.shape[-1])


def _embedding_grad(module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor):
    """Token ids ``(B, T)`` and grad-outputs ``(B, T, d)``, padding tokens' grads zeroed."""
    ids = ids.reshape(ids.shape[0], -1).long()
    g = _tokens(g)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


@contextmanager
def _requiring_grad(params: Sequence[nn.Parameter]):
    """Opacus' samplers skip parameters that do not require grad; featurisation froze them all."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _opacus_grads(module: nn.Module, params, activations, g) -> list[torch.Tensor]:
    sampler = GradSampleModule.GRAD_SAMPLERS[type(module)]
    with _requiring_grad(params):
        grads = sampler(module, activations, g)
    missing = [p for p in params if p not in grads]
    if missing:
        raise RuntimeError(
            f"Opacus' grad sampler for {type(module).__name__} returned no grad for a selected parameter"
        )
    return [grads[p].reshape(g.shape[0], -1) for p in params]


def check_supported(
    module: nn.Module,
    module_name: str,
    param: nn.Parameter,
    param_name: str,
    *,
    strict: bool,
    exact: bool,
) -> None:
    """Raise ``NotImplementedError`` naming the parameter and module if no rule covers it."""
    where = _where(param_name, module_name, module)
    if strict and any(True for _ in module.buffers(recurse=False)):
        raise NotImplementedError(
            f"{where}: the module has buffers, so its per-example gradients are not defined in "
            "strict mode (pass strict=False to ignore the buffers)"
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        raise NotImplementedError(
            f"{where}: scale_grad_by_freq=True has no per-example gradient rule"
        )
    if isinstance(module, (nn.Linear, nn.Embedding)) and param is module.weight:
        return
    if isinstance(module, nn.Linear) and param is module.bias:
        return
    if param.dim() > 2 or (param.dim() == 2 and not exact):
        raise NotImplementedError(
            f"{where}: a {param.dim()}-D parameter has a sketch rule only as the weight of "
            "nn.Linear or nn.Embedding"
        )
    if type(module) not in GradSampleModule.GRAD_SAMPLERS:
        raise NotImplementedError(
            f"{where}: no per-example gradient rule (Opacus has no grad sampler for this module type)"
        )


class SketchRules:
    """TensorSketch / CountSketch features of size ``m`` (see :mod:`sdi.sketch`)."""

    exact = False

    def __init__(self, params: Sequence[nn.Parameter], m: int, seed: int, backend: SketchBackend):
        """Draw one table per parameter, in the order given, from ``torch.Generator().manual_seed(seed)``."""
        if int(m) <= 0:
            raise ValueError(f"projection_size must be positive, got {m}")
        self.m = int(m)
        self.backend = backend
        generator = torch.Generator().manual_seed(int(seed))
        self.tables: dict[nn.Parameter, CountSketchHash | TensorSketchHash] = {}
        for p in params:
            if p.dim() == 2:
                table = draw_tensor_sketch(p.shape[0], p.shape[1], self.m, generator)
            else:
                table = draw_count_sketch(p.numel(), self.m, generator)
            self.tables[p] = table.to(p.device)

    def width(self, param: nn.Parameter) -> int:
        return self.m

    def features(
        self, module: nn.Module, params, activations, g: torch.Tensor
    ) -> list[torch.Tensor]:
        be = self.backend
        if isinstance(module, nn.Linear):
            g = _tokens(g)
            out = []
            for p in params:
                if p is module.weight:
                    out.append(be.tensor_sketch_linear(_tokens(activations[0]), g, self.tables[p]))
                else:
                    out.append(be.count_sketch(g.sum(dim=1), self.tables[p]))
            return out
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grad(module, activations[0], g)
            return [be.tensor_sketch_embedding(ids, g, self.tables[params[0]])]
        grads = _opacus_grads(module, params, activations, g)
        return [be.count_sketch(gs, self.tables[p]) for p, gs in zip(params, grads, strict=True)]


class ExactRules:
    """The per-example, per-use gradients themselves, flattened to ``(B, numel)``."""

    exact = True

    def width(self, param: nn.Parameter) -> int:
        return param.numel()

    def features(
        self, module: nn.Module, params, activations, g: torch.Tensor
    ) -> list[torch.Tensor]:
        B = g.shape[0]
        if isinstance(module, nn.Linear):
            g = _tokens(g).float()
            out = []
            for p in params:
                if p is module.weight:
                    a = _tokens(activations[0]).float()
                    out.append(torch.einsum("bto,bti->boi", g, a).reshape(B, -1))
                else:
                    out.append(g.sum(dim=1))
            return out
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grad(module, activations[0], g)
            rows = ids + module.num_embeddings * torch.arange(B, device=ids.device).unsqueeze(1)
            dense = torch.zeros(B * module.num_embeddings, g.shape[-1], device=g.device)
            dense.index_add_(0, rows.reshape(-1), g.reshape(-1, g.shape[-1]).float())
            return [dense.reshape(B, -1)]
        return [gs.float() for gs in _opacus_grads(module, params, activations, g)]
