"""An independent per-use autograd oracle for exact TracIn / SDI (issue 18), sharing no code with sdi.

Every time a torch function receives one of the model's parameters *itself* (``F.linear(x,
self.weight)``, ``self.weight.to(dtype)``, ``bank[i]``, ``x * self.scale``, ``F.embedding``,
``F.multi_head_attention_forward(..., in_proj_weight, ...)``, ...), a ``TorchFunctionMode`` hands the
function a fresh leaf copy of that parameter instead: an *access*. Autograd then gives each access
its own gradient, already mapped back onto the parameter's shape through whatever views, slices
and casts follow it (a slice ``bank[i]`` gets a gradient that is zero outside slice ``i``). The
model runs one example at a time, so these are per-example gradients by construction; no
per-example structure is guessed.

A test says which accesses count (``counted``) and the step of each (``step_of``); an access whose
copy gets no gradient (``p.shape``, ``p.requires_grad``, a branch that does not reach the loss) is
dropped. The per-step gradient of a parameter is the sum of its counted accesses' gradients in
that step; then

    TracIn[i, j] = < sum_s phi_s(i), sum_t phi_t(j) >,   SDI[i, j, t] = < sum_s phi_s(i), phi_t(j) >,

summed over parameters (flattened and concatenated), exactly DESIGN.md section 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


@dataclass
class Access:
    """One torch function's access to a parameter: ``name`` (as in ``model.named_parameters()``),
    ``index`` (the int of ``p[i]``, else None), the qualified names of the modules whose call was
    running (outermost first), the leaf copy handed to the function, and ``k``: how many earlier
    accesses of this forward had the same ``(name, index)`` and reached the loss (set after the
    backward)."""

    name: str
    index: int | None
    modules: tuple[str, ...]
    proxy: torch.Tensor
    k: int = -1
    grad: torch.Tensor | None = field(default=None, repr=False)


class _PerAccessCopies(TorchFunctionMode):
    """Swaps each parameter argument of a torch function for a fresh leaf copy and records it."""

    def __init__(self, names: dict[int, str], stack: list[str]):
        super().__init__()
        self.names, self.stack, self.accesses = names, stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        if not any(isinstance(x, torch.Tensor) and id(x) in self.names for x in leaves):
            return func(*args, **kwargs)
        index = args[1] if func is torch.Tensor.__getitem__ and isinstance(args[1], int) else None

        def swap(x):
            if isinstance(x, torch.Tensor) and id(x) in self.names:
                proxy = x.detach().clone().requires_grad_(True)
                self.accesses.append(Access(self.names[id(x)], index, tuple(self.stack), proxy))
                return proxy
            return x

        args, kwargs = tree_map(swap, (args, kwargs))
        return func(*args, **kwargs)


class _ModuleStack:
    """The qualified names of the model's modules whose call is running (forward pre/post hooks)."""

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name), prepend=True))
            self.handles.append(module.register_forward_hook(self._leave(name), always_call=True))

    def _enter(self, name):
        def hook(module, args):
            self.names.append(name)

        return hook

    def _leave(self, name):
        def hook(module, args, output):
            assert self.names and self.names[-1] == name, (self.names, name)
            self.names.pop()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def one_example_accesses(model: nn.Module, loss_fn, example) -> list[Access]:
    """The accesses of one forward + backward of ``loss_fn(model, example)`` (a batch of one),
    with their gradients (``None`` where the access does not reach the loss)."""
    names = {id(p): n for n, p in model.named_parameters()}
    stack = _ModuleStack(model)
    try:
        mode = _PerAccessCopies(names, stack.names)
        with mode:
            loss = loss_fn(model, example)
        assert loss.numel() == 1, f"the oracle runs one example at a time; got loss {loss.shape}"
    finally:
        stack.close()
    accesses = mode.accesses
    grads = torch.autograd.grad(loss.sum(), [a.proxy for a in accesses], allow_unused=True)
    seen: dict[tuple[str, int | None], int] = {}
    for a, g in zip(accesses, grads, strict=True):
        a.grad = g
        if g is not None:
            a.k = seen.get((a.name, a.index), 0)
            seen[(a.name, a.index)] = a.k + 1
    return [a for a in accesses if a.grad is not None]


def owned_or_inside(model: nn.Module, selected: Iterable[nn.Module]) -> Callable[[Access], bool]:
    """The issue's selection rule: an access counts if its parameter is owned by a selected module
    (wherever the access happens), or if it happens inside a selected module's call."""
    selected = list(selected)
    by_module = {id(m): n for n, m in model.named_modules()}
    prefixes = [by_module[id(m)] for m in selected]
    owned = {id(p) for m in selected for p in m.parameters()}
    owned_names = {n for n, p in model.named_parameters() if id(p) in owned}
    return lambda a: a.name in owned_names or any(p in a.modules for p in prefixes)


def per_step_gradients(
    model: nn.Module,
    loss_fn,
    batches,
    counted: Callable[[Access], bool],
    step_of: Callable[[Access], int],
    steps: int,
) -> torch.Tensor:
    """``(N, steps, P)``: per example (loader order) and step, the summed gradient of the counted
    accesses, flattened over ``model.named_parameters()`` (uncounted parameters stay zero)."""
    params = dict(model.named_parameters())
    offsets, total = {}, 0
    for name, p in params.items():
        offsets[name] = total
        total += p.numel()
    rows = []
    for batch in batches:
        n = next(iter(batch.values())).shape[0]
        for i in range(n):
            example = {key: v[i : i + 1] for key, v in batch.items()}
            row = torch.zeros(steps, total, dtype=torch.float64)
            for a in one_example_accesses(model, loss_fn, example):
                if counted(a):
                    t, start = step_of(a), offsets[a.name]
                    assert 0 <= t < steps, f"step {t} of {a} outside [0, {steps})"
                    row[t, start : start + a.grad.numel()] += a.grad.reshape(-1).double()
            rows.append(row)
    return torch.stack(rows)


def exact_tracin_sdi(train: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TracIn ``(N_train, N_query)`` and SDI ``(N_train, N_query, steps)`` from per-step gradients
    ``(N, steps, P)`` of both sides."""
    sdi = torch.einsum("np,qtp->nqt", train.sum(1), query)
    return sdi.sum(-1), sdi
