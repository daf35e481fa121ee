"""The two feature modes: what a feature is, and the state the rules share (:mod:`.ops` dispatches).

- :class:`SketchRules` (projected estimator): one hash table per parameter, drawn in the order the
  parameters are given from one seeded generator; features ``(B, m)``.
- :class:`ExactRules` (full-gradient baseline): the per-example, per-use gradient itself, flattened:
  ``(B, numel)``.
- :class:`StepSums`: ``sum_t`` of the sketches of every use of one backward pass, summed wherever
  the module's rule finds it cheapest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..backend import SketchBackend
from ..kernels import torch_ops
from ..sketch import CountSketchHash, TensorSketchHash, draw_count_sketch, draw_tensor_sketch
from .linear import explicit_is_cheaper
from .registry import ModuleRule, rule_for


class _Mode:
    """Rule lookup, resolved once per module (so a registration made later changes nothing here)."""

    exact: bool

    def __init__(self, owners: Sequence[nn.Module] | None, rules: dict | None):
        self._rules: dict[nn.Module, ModuleRule] = dict(rules or {})
        for module in owners or ():
            self.rule_of(module)

    def use_rule(self, module: nn.Module, rule: ModuleRule) -> None:
        self._rules[module] = rule

    def rule_of(self, module: nn.Module) -> ModuleRule:
        rule = self._rules.get(module)
        if rule is None:
            rule = self._rules[module] = rule_for(module)
        return rule


class SketchRules(_Mode):
    """TensorSketch / CountSketch features of size ``m`` (see :mod:`sdi.sketch`).

    Args:
        params: the parameters, in table-drawing order (the featuriser passes model order).
        m, seed, backend: the sketch.
        owners: the module owning each parameter (parallel to ``params``): its rule draws the
            table. Without an owner (``None``: captured at the operation), a parameter of 2 or
            more dims gets a TensorSketch of it as the matrix ``(prod(shape[:-1]), shape[-1])``
            and a vector a CountSketch.
        rules: module -> rule, overriding the registry for those modules.
    """

    exact = False

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        m: int,
        seed: int,
        backend: SketchBackend,
        owners: Sequence[nn.Module] | None = None,
        rules: dict[nn.Module, ModuleRule] | None = None,
    ):
        """Draw one table per parameter, in the order given, from ``torch.Generator().manual_seed(seed)``."""
        if int(m) <= 0:
            raise ValueError(f"projection_size must be positive, got {m}")
        super().__init__(owners, rules)
        self.m = int(m)
        self.backend = backend
        generator = torch.Generator().manual_seed(int(seed))
        self.tables: dict[nn.Parameter, CountSketchHash | TensorSketchHash] = {}
        for i, p in enumerate(params):
            if owners is not None and owners[i] is not None:
                table = self.rule_of(owners[i]).draw_table(owners[i], p, self.m, generator)
            elif p.dim() >= 2:  # as a matrix (prod(shape[:-1]), shape[-1]): banks slice by rows
                table = draw_tensor_sketch(p.numel() // p.shape[-1], p.shape[-1], self.m, generator)
            else:
                table = draw_count_sketch(p.numel(), self.m, generator)
            self.tables[p] = table.to(p.device)
        self._signed_index: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}
        # One (B, d_out, d_in) gradient buffer per explicit-path weight, reused by every batch:
        # allocating it afresh costs page faults comparable to the matmul that fills it.
        self._grad_buffers: dict[nn.Parameter, torch.Tensor] = {}
        # Step sums computed beside per-use features (one pass for both) keep theirs apart.
        self._separate_sum_buffers: dict[nn.Parameter, torch.Tensor] = {}

    def width(self, param: nn.Parameter) -> int:
        return self.m

    def prefers_explicit(
        self, param: nn.Parameter, tokens: int, device: torch.device, batch: int = 1
    ) -> bool:
        """Whether the Linear weight ``param`` is cheaper to sketch from its materialised gradient.

        ``tokens`` per example, ``batch`` examples. Only for CPU tensors under a backend that runs
        the CPU fast paths (:attr:`SketchBackend.runs_cpu_fast_paths`; the constants are CPU
        timings, and an explicit ``SDI_BACKEND=triton`` keeps its kernels, also in the CPU
        interpreter); the cost model and its memory cap are :func:`sdi.rules.linear.explicit_is_cheaper`.
        """
        if device.type != "cpu" or not self.backend.runs_cpu_fast_paths:
            return False
        d_out, d_in = param.shape
        return explicit_is_cheaper(d_out, d_in, tokens, batch, self.m)

    def weight_grads(
        self,
        param: nn.Parameter,
        a: torch.Tensor,
        g: torch.Tensor,
        *,
        add: bool = False,
        buffers: dict[nn.Parameter, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``param``'s per-example gradients ``(B, d_out, d_in)`` in its reused buffer (added to it
        if ``add``), taken from ``buffers`` (default: the per-use features' buffers)."""
        buffers = self._grad_buffers if buffers is None else buffers
        buffer = buffers.get(param)
        if buffer is None or buffer.shape[0] != a.shape[0] or buffer.device != a.device:
            buffer = buffers[param] = torch_ops.linear_weight_grads(a, g)
            return buffer
        return torch_ops.linear_weight_grads(a, g, buffer, add=add)

    def sketch_flat(self, param: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        """Sketch per-example gradients ``(B, numel)`` (or ``(B, *shape)``) of ``param`` by its table."""
        table = self.tables[param]
        B = grad.shape[0]
        if isinstance(table, CountSketchHash):
            return self.backend.count_sketch(grad.reshape(B, -1).float(), table)
        return self.sketch_dense(param, grad.reshape(B, table.out.d, -1).float())

    def sketch_dense(self, param: nn.Parameter, phi: torch.Tensor) -> torch.Tensor:
        """Sketch explicit gradients ``phi (B, d_out, d_in)`` fp32 of ``param`` -> ``(B, m)``."""
        if param not in self._signed_index:
            index = torch_ops.signed_index(self.tables[param])
            # Both memory layouts that linear_weight_grads returns, so neither is copied per call.
            self._signed_index[param] = (index, index.t().contiguous().t())
        index, transposed = self._signed_index[param]
        return torch_ops.sketch_dense(phi, index if phi.is_contiguous() else transposed, self.m)

    def step_sums(self, separate: bool = False) -> StepSums:
        """An accumulator of the features summed over all uses of one backward pass; ``separate``:
        with gradient buffers of its own, for a pass that also computes per-use features."""
        return StepSums(self, self._separate_sum_buffers if separate else self._grad_buffers)


class StepSums:
    """``sum_t`` of the features of every use in one backward pass, summed in the cheapest place.

    Sketches are linear, so ``sum_t S(phi_t) = S(sum_t phi_t)``. Each rule's ``add_step`` decides:
    what is cheap to add stays unsketched until :meth:`sketches` (per-example gradients of
    explicit-path Linear weights ``(B, d_out, d_in)``, added to by the batched matmul itself; biases
    and Opacus-covered parameters ``(B, numel)``), hashed once per pass instead of once per use; the
    other rules add their per-use sketches.
    """

    def __init__(self, rules: SketchRules, buffers: dict[nn.Parameter, torch.Tensor]):
        self.rules = rules
        self.buffers = buffers  # the explicit-path weights' reused gradient buffers
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        self._sketches: dict[nn.Parameter, torch.Tensor] = {}
        self._in_buffer: set[nn.Parameter] = set()  # sums held in the rules' reused buffer

    @staticmethod
    def _add(sums: dict, param: nn.Parameter, value: torch.Tensor) -> None:
        if param in sums:
            sums[param] += value.reshape(sums[param].shape)
        else:
            sums[param] = value.to(torch.float32)

    def add_grad(
        self, param: nn.Parameter, grad: torch.Tensor, sources: torch.Tensor | None = None
    ) -> None:
        """Add a dense per-example gradient ``(B, numel)`` or ``(B, d_out, d_in)``; with
        ``sources``, a gradient ``(B, *sources.shape)`` w.r.t. elements picked from ``param``
        (``mix[0]``, ``gain[:, None]``: :meth:`sdi.derived.Derived.element_sources`), added
        where each element came from."""
        held = self._grads.get(param)
        if param in self._in_buffer:  # the buffer is overwritten by the next batch: own the sum
            held = self._grads[param] = held.clone()
            self._in_buffer.discard(param)
        if sources is None:
            if held is None:
                self._grads[param] = grad.to(torch.float32)
            else:
                held.add_(grad.reshape(held.shape))
            return
        B = grad.shape[0]
        if held is None:
            held = self._grads[param] = grad.new_zeros(B, param.numel(), dtype=torch.float32)
        elif not held.is_contiguous():  # a Linear weight's transposed buffer
            held = self._grads[param] = held.contiguous()
        held.view(B, -1).index_add_(1, sources.reshape(-1), grad.reshape(B, -1).float())

    def add_linear(self, param: nn.Parameter, a: torch.Tensor, g: torch.Tensor) -> None:
        """Add ``G^T A`` ``(B, d_out, d_in)`` of a whole Linear weight, in its reused buffer."""
        held = self._grads.get(param)
        if held is None or param in self._in_buffer:
            grads = self.rules.weight_grads(param, a, g, add=held is not None, buffers=self.buffers)
            self.set_grad(param, grads)
            self._in_buffer.add(param)
        else:  # the sum is a tensor of its own: add a copy (the buffer is overwritten)
            self.add_grad(param, self.rules.weight_grads(param, a, g, buffers=self.buffers).clone())

    def set_grad(self, param: nn.Parameter, grad: torch.Tensor) -> None:
        """Hold ``grad`` as ``param``'s running sum (a buffer the rule added to in place)."""
        self._grads[param] = grad

    def has_grad(self, param: nn.Parameter) -> bool:
        return param in self._grads

    def add_sketch(self, param: nn.Parameter, sketch: torch.Tensor) -> None:
        """Add a ``(B, m)`` sketch."""
        self._add(self._sketches, param, sketch)

    @torch.no_grad()
    def sketches(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(param, (B, m) fp32)`` for every parameter seen; empties the accumulator."""
        out = list(self._sketches.items())
        for p, grad in self._grads.items():
            out.append((p, self.rules.sketch_flat(p, grad)))
        self._grads, self._sketches, self._in_buffer = {}, {}, set()
        return out


class ExactRules(_Mode):
    """The per-example, per-use gradients themselves, flattened to ``(B, numel)``.

    ``owners`` / ``rules`` as for :class:`SketchRules`.
    """

    exact = True

    def __init__(
        self,
        owners: Sequence[nn.Module] | None = None,
        rules: dict[nn.Module, ModuleRule] | None = None,
    ):
        super().__init__(owners, rules)

    def width(self, param: nn.Parameter) -> int:
        return param.numel()
