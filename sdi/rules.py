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

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from opacus.grad_sample.grad_sample_module import GradSampleModule

from .backend import SketchBackend
from .freezing import requires_grad_set
from .kernels import torch_ops
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


def _opacus_grads(module: nn.Module, params, activations, g) -> list[torch.Tensor]:
    sampler = GradSampleModule.GRAD_SAMPLERS[type(module)]
    # Opacus' samplers skip parameters that do not require grad; featurisation froze them all.
    with requires_grad_set(params, True):
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


# Cost model of the two Linear-weight paths on a CPU, in ns per example and use, fit to one thread
# of a Xeon (AVX-512, torch 2.13) over m = 256..4096, T = 1..256, d = 64..1024; it picks the faster
# path in all but near-ties. bench/test_sketch_ops.py times both paths to check it elsewhere.
#   FFT:      T * (_FFT_NS * m * log2(m) + _HASH_NS * (d_in + d_out))
#   explicit: d_out * d_in * (_HASH_NS + _MATMUL_NS * 2 * T)
_FFT_NS, _HASH_NS, _MATMUL_NS = 0.5, 1.8, 0.009
# The explicit path keeps one (B, d_out, d_in) fp32 buffer per weight. Past this size it is not taken,
# however fast, so that a large layer over long sequences cannot claim gigabytes of memory.
EXPLICIT_MAX_BUFFER_BYTES = 128 << 20


class SketchRules:
    """TensorSketch / CountSketch features of size ``m`` (see :mod:`sdi.sketch`).

    A Linear weight is sketched by whichever of the two exact paths of :mod:`sdi.kernels.torch_ops`
    the cost model above says is cheaper for the call's shape: the FFT path of the backend, or (on
    CPU) the materialised gradient ``G^T A`` hashed with the table's 2-D index, cached per table.
    Both give the same sketch up to float rounding.
    """

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
        self._signed_index: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}
        # One (B, d_out, d_in) gradient buffer per explicit-path weight, reused by every batch:
        # allocating it afresh costs page faults comparable to the matmul that fills it.
        self._grad_buffers: dict[nn.Parameter, torch.Tensor] = {}

    def width(self, param: nn.Parameter) -> int:
        return self.m

    def prefers_explicit(
        self, param: nn.Parameter, tokens: int, device: torch.device, batch: int = 1
    ) -> bool:
        """Whether the Linear weight ``param`` is cheaper to sketch from its materialised gradient.

        ``tokens`` per example, ``batch`` examples. Only for CPU tensors under a torch-running
        backend (the constants are CPU timings, and an explicit ``SDI_BACKEND=triton`` keeps its
        kernels, also in the CPU interpreter), and only while the gradient buffer stays within
        :data:`EXPLICIT_MAX_BUFFER_BYTES`.
        """
        if device.type != "cpu" or self.backend.name == "triton":
            return False
        d_out, d_in = param.shape
        if batch * d_out * d_in * 4 > EXPLICIT_MAX_BUFFER_BYTES:
            return False
        fft = tokens * (_FFT_NS * self.m * math.log2(max(self.m, 2)) + _HASH_NS * (d_in + d_out))
        return d_out * d_in * (_HASH_NS + _MATMUL_NS * 2 * tokens) < fft

    def weight_grads(
        self, param: nn.Parameter, a: torch.Tensor, g: torch.Tensor, *, add: bool = False
    ) -> torch.Tensor:
        """``param``'s per-example gradients ``(B, d_out, d_in)`` in its reused buffer (added to it if ``add``)."""
        buffer = self._grad_buffers.get(param)
        if buffer is None or buffer.shape[0] != a.shape[0] or buffer.device != a.device:
            buffer = self._grad_buffers[param] = torch_ops.linear_weight_grads(a, g)
            return buffer
        return torch_ops.linear_weight_grads(a, g, buffer, add=add)

    def sketch_dense(self, param: nn.Parameter, phi: torch.Tensor) -> torch.Tensor:
        """Sketch explicit gradients ``phi (B, d_out, d_in)`` fp32 of ``param`` -> ``(B, m)``."""
        if param not in self._signed_index:
            index = torch_ops.signed_index(self.tables[param])
            # Both memory layouts that linear_weight_grads returns, so neither is copied per call.
            self._signed_index[param] = (index, index.t().contiguous().t())
        index, transposed = self._signed_index[param]
        return torch_ops.sketch_dense(phi, index if phi.is_contiguous() else transposed, self.m)

    def features(
        self, module: nn.Module, params, activations, g: torch.Tensor
    ) -> list[torch.Tensor]:
        be = self.backend
        if isinstance(module, nn.Linear):
            g = _tokens(g)
            out = []
            for p in params:
                if p is module.bias:
                    out.append(be.count_sketch(g.sum(dim=1), self.tables[p]))
                    continue
                a = _tokens(activations[0])
                if self.prefers_explicit(p, a.shape[1], a.device, a.shape[0]):
                    out.append(self.sketch_dense(p, self.weight_grads(p, a, g)))
                else:
                    out.append(be.tensor_sketch_linear(a, g, self.tables[p]))
            return out
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grad(module, activations[0], g)
            return [be.tensor_sketch_embedding(ids, g, self.tables[params[0]])]
        grads = _opacus_grads(module, params, activations, g)
        return [be.count_sketch(gs, self.tables[p]) for p, gs in zip(params, grads, strict=True)]

    def step_sums(self) -> StepSums:
        """An accumulator of the features summed over all uses of one backward pass."""
        return StepSums(self)


class StepSums:
    """``sum_t`` of the features of every use in one backward pass, summed in the cheapest place.

    Sketches are linear, so ``sum_t S(phi_t) = S(sum_t phi_t)``. What is cheap to add stays
    unsketched until :meth:`sketches`: per-example gradients of explicit-path Linear weights
    (``(B, d_out, d_in)``, added to by the batched matmul itself), biases and other 1-D parameters
    (``(B, d)``). Those are then hashed once per pass instead of once per use; FFT-path and
    Embedding weights add their per-use sketches.
    """

    def __init__(self, rules: SketchRules):
        self.rules = rules
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._sketches: dict[nn.Parameter, torch.Tensor] = {}

    def _add(self, sums: dict, param: nn.Parameter, value: torch.Tensor) -> None:
        if param in sums:
            sums[param] += value
        else:
            sums[param] = value.to(torch.float32)

    def add(self, module: nn.Module, params, activations, g: torch.Tensor) -> None:
        """Add one use (arguments as for :meth:`SketchRules.features`)."""
        rules = self.rules
        if isinstance(module, nn.Linear):
            g = _tokens(g)
            for p in params:
                if p is module.bias:
                    self._add(self._grads, p, g.sum(dim=1))
                    continue
                a = _tokens(activations[0])
                if rules.prefers_explicit(p, a.shape[1], a.device, a.shape[0]):
                    self._grads[p] = rules.weight_grads(p, a, g, add=p in self._grads)
                else:
                    self._add(
                        self._sketches, p, rules.backend.tensor_sketch_linear(a, g, rules.tables[p])
                    )
            return
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grad(module, activations[0], g)
            feature = rules.backend.tensor_sketch_embedding(ids, g, rules.tables[params[0]])
            self._add(self._sketches, params[0], feature)
            return
        for p, gs in zip(params, _opacus_grads(module, params, activations, g), strict=True):
            self._add(self._grads, p, gs)

    @torch.no_grad()
    def sketches(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(param, (B, m) fp32)`` for every parameter seen; empties the accumulator."""
        out = list(self._sketches.items())
        for p, grad in self._grads.items():
            if grad.dim() == 3:
                out.append((p, self.rules.sketch_dense(p, grad)))
            else:
                out.append((p, self.rules.backend.count_sketch(grad, self.rules.tables[p])))
        self._grads, self._sketches = {}, {}
        return out


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
