"""The generic rule: a module's call re-run per example, for the module's direct parameters.

It serves modules whose type it is registered for, and modules whose forward hides the batch
from the operation-level capture (an MoE router over ``x.reshape(-1, d)``): their call's arguments
still have it (:mod:`sdi.capture`, :class:`sdi.uses.ModuleFallback`).

For one use of a module, the per-example gradient w.r.t. its *direct* (selected) parameters is the
vector-Jacobian product of the module's forward, re-run on that use's captured arguments (positional
and keyword), with the use's grad-output as the cotangent -- one example at a time, so the gradient
is exactly what autograd gives on a per-example loop. Two ways, chosen per module once:

- ``torch.func``: ``vmap`` over the batch of ``vjp(functional_call(module, ...))``, each example seen
  as a batch of one;
- a per-example loop of the same recompute, for forwards ``vmap`` cannot follow (data-dependent
  shapes: MoE top-k routing, ``nonzero``, ``.item()``...). The first ``vmap`` failure of a module
  switches it to the loop for good; a forward that draws random numbers (dropout in training mode)
  is an error instead, since no recompute can reproduce it.

Which arguments are per-example, and on which dimension, is the capture's (:mod:`sdi.capture`: by
data flow from the batch, never by a size that happens to equal it); the others (rotary tables,
masks shared by the batch) go to every example whole. The cotangent is the grad of the module's
first tensor output; the hook manager refuses a use whose other outputs carry a gradient.

Memory: the examples of one use are processed in chunks whose dense per-example gradients stay
within :data:`GENERIC_CHUNK_BYTES`. Buffers are passed as copies, so a forward that changes them
cannot change the model. In strict mode the first use of each module per batch is also checked:
the recomputed outputs must equal the forward's, else the forward couples the examples of a batch
(batch statistics), is random, or read state that changed since -- an error naming the module.

Projected: a CountSketch of the flattened gradient (table drawn as ``draw_count_sketch(numel)``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture import Batched
from ..hooks import _first_tensor
from .registry import ModuleRule, Use

#: Most bytes of dense per-example gradients (fp32, all selected direct parameters of the module)
#: held at once for one use; the batch is split into chunks to stay below it (a chunk has >= 1 example).
GENERIC_CHUNK_BYTES = 256 << 20


class GenericRule(ModuleRule):
    keeps_output = True

    def __init__(self):
        self._loop_only: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def uses_loop(self, module: nn.Module) -> bool:
        """Whether ``module``'s forward failed under ``vmap`` and is recomputed example by example."""
        return module in self._loop_only

    def check(self, module, param, *, exact: bool) -> str | None:
        if not any(param is p for p in module.parameters(recurse=False)):
            return "the generic rule covers direct parameters of the module only"
        return None

    def grads(self, module, params, use: Use) -> list[torch.Tensor]:
        parts = [[] for _ in params]
        for chunk in self._chunks(module, params, use):
            for acc, g in zip(parts, chunk, strict=True):
                acc.append(g)
        return [torch.cat(acc) for acc in parts]

    def sketch(self, rules, module, params, use: Use) -> list[torch.Tensor]:
        parts = [[] for _ in params]
        for chunk in self._chunks(module, params, use):
            for acc, p, g in zip(parts, params, chunk, strict=True):
                acc.append(rules.sketch_flat(p, g))
        return [torch.cat(acc) for acc in parts]

    def add_step(self, sums, module, params, use: Use) -> None:
        # Sketches, not dense gradients: the pass's sum then stays (B, m) however large the module.
        for p, s in zip(params, self.sketch(sums.rules, module, params, use), strict=True):
            sums.add_sketch(p, s)

    def _chunks(self, module: nn.Module, params, use: Use):
        """Yield, chunk of examples by chunk, one ``(b, numel)`` fp32 gradient per param."""
        op = use.op
        if op is None:
            raise RuntimeError(f"the generic rule needs the call of {type(module).__name__}")
        bd = op.out_dim
        names = {id(p): n for n, p in module.named_parameters()}  # its own, or a submodule's
        primals = {names[id(p)]: p.detach() for p in params}
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        grad = use.grad.movedim(0, bd) if bd else use.grad
        B = use.batch
        leaves, spec = tree_flatten((op.args, op.kwargs))
        # Per-example by data flow (sdi.capture); one of size 1 along its batch goes whole.
        rows_of = [
            x if isinstance(x, Batched) and x.tensor.shape[x.dim] == B else None for x in leaves
        ]
        leaves = [x.tensor if isinstance(x, Batched) else x for x in leaves]
        dims = [x.dim for x in rows_of if x is not None]

        def forward(p: dict, batch_leaves: list[torch.Tensor]) -> torch.Tensor:
            it = iter(batch_leaves)
            args, kwargs = tree_unflatten(
                [x if r is None else next(it) for x, r in zip(leaves, rows_of, strict=True)], spec
            )
            out = _first_tensor(functional_call(module, {**p, **buffers}, tuple(args), kwargs))
            if out is None:
                raise RuntimeError(f"{type(module).__name__} returned no tensor on recompute")
            return out

        numel = sum(p.numel() for p in params)
        size = max(1, GENERIC_CHUNK_BYTES // (4 * numel))
        for start in range(0, B, size):
            n = min(size, B - start)
            rows = [r.tensor.narrow(r.dim, start, n) for r in rows_of if r is not None]
            g = grad.narrow(bd, start, n)
            grads, outs = self._vjp(module, forward, primals, rows, dims, g, bd)
            if op.output is not None:
                _check_recompute(module, outs, op.output.narrow(bd, start, n).movedim(bd, 0))
            yield [grads[names[id(p)]].reshape(n, -1).float() for p in params]

    def _vjp(self, module, forward, primals, rows, dims, g, bd):
        """``({name: (b, *shape)}, outputs (b, ...))`` by vmap, else (or once it failed) by loop;
        ``rows`` have their batch on ``dims``, ``g`` and the outputs on ``bd``."""
        if module not in self._loop_only:

            def one(p, rows_i, g_i):
                batch = [r.unsqueeze(d) for r, d in zip(rows_i, dims, strict=True)]
                out, pull = vjp(lambda q: forward(q, batch), p)
                return pull(g_i.unsqueeze(bd))[0], out.squeeze(bd)

            try:
                with torch.enable_grad():
                    return vmap(one, in_dims=(None, dims, bd))(primals, rows, g)
            except Exception as err:  # vmap raises several kinds; the loop re-raises real bugs
                if "random" in str(err):
                    raise RuntimeError(
                        f"{type(module).__name__}'s forward draws random numbers (dropout in "
                        "training mode?): a per-example recompute cannot reproduce it; call "
                        "model.eval() before featurising"
                    ) from err
                self._loop_only.add(module)  # data-dependent shapes: the loop from now on
        return _loop_vjp(forward, primals, rows, dims, g, bd)


def _loop_vjp(forward, primals: dict, rows: list, dims: list, g: torch.Tensor, bd: int):
    n = g.shape[bd]
    grads = {
        k: torch.zeros(n, *v.shape, dtype=torch.float32, device=v.device)
        for k, v in primals.items()
    }
    outs = []
    for i in range(n):
        with torch.enable_grad():
            p = {k: v.detach().requires_grad_(True) for k, v in primals.items()}
            out = forward(p, [r.narrow(d, i, 1) for r, d in zip(rows, dims, strict=True)])
            if out.requires_grad:
                got = torch.autograd.grad(
                    out, list(p.values()), g.narrow(bd, i, 1), allow_unused=True
                )
                for k, gk in zip(p, got, strict=True):
                    if gk is not None:
                        grads[k][i] = gk
        outs.append(out.detach().squeeze(bd))
    return grads, torch.stack(outs)


def _check_recompute(module: nn.Module, got: torch.Tensor, want: torch.Tensor) -> None:
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(want.abs().max()) if want.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(
        got.to(want.dtype), want, rtol=tol, atol=tol * max(scale, 1e-12)
    ):
        diff = (got.to(want.dtype) - want).abs().max() if got.shape == want.shape else "shape"
        raise RuntimeError(
            f"recomputing {type(module).__name__} example by example does not give its forward's "
            f"output (max difference {diff}): its forward couples the examples of a batch (batch "
            "statistics), is random, or depends on state changed since the forward; the generic "
            "rule's per-example gradients would be wrong (strict mode)"
        )


GENERIC = GenericRule()
