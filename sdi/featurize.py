"""Per-example, per-step features of the selected parameters, computed during one backward pass.

The :class:`Featurizer` owns the hooks (:mod:`sdi.hooks`), the per-layer rules (:mod:`sdi.rules`)
and the layout of the feature tensor: every selected parameter owns a block of columns, so a batch's
features are one fp32 tensor ``(B, steps, D)`` -- or ``(B, D)``, summed over steps in place, when
only the full gradient is needed (TracIn, and the train side of SDI).

Featurisation freezes every model parameter for the duration of the pass: the hooks need only the
grad-outputs of the selected modules, so backward skips every weight-gradient matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .diagnose import (
    SCALAR_SUM_LOSS,
    never_ran_error,
    no_step_warning,
    root_selection_error,
    unused_error,
)
from .freezing import requires_grad_set
from .hooks import Call, HookManager
from .outputs import FeatureSet
from .rules import ExactRules, SketchRules, check_supported
from .sizes import check_features_fit
from .steps import StepPlan, plan_steps
from .validation import warn_outside_package

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class ParamBlock:
    """Where one selected parameter's feature lives in the flat feature tensor."""

    name: str
    param: nn.Parameter
    module: nn.Module
    columns: slice
    shape: tuple[int, ...]  # one step's feature, unflattened


@dataclass
class _Pass:
    """State of the backward pass in flight."""

    plan: StepPlan
    out: torch.Tensor | None  # (B, steps, D) per step, if wanted
    out_sum: torch.Tensor | None  # (B, D) summed over steps, if wanted
    scale: float
    sums: Any = None  # the rules' step-sum accumulator when summing over steps, if they have one


def _check_loss(loss: Any) -> torch.Tensor:
    """``loss_fn``'s result, refused unless it is a scalar or a vector ``(B,)`` of ``B > 0``."""
    if not torch.is_tensor(loss):
        raise TypeError(
            f"loss_fn must return a tensor, got {type(loss).__name__}: return the per-example "
            "losses, a tensor of shape (B,)"
        )
    if loss.dim() > 1:
        raise ValueError(
            f"loss_fn must return a scalar or per-example losses (B,), got shape {tuple(loss.shape)}: "
            "reduce every dimension but the batch (per-token losses (B, T): .mean(dim=1))"
        )
    if loss.numel() == 0:
        raise ValueError(
            "loss_fn returned no loss (shape (0,)): the batch holds no example. sdi refuses empty "
            "batches (they would shift no row but hide a loader bug): drop them from the loader"
        )
    return loss


def _check_loss_length(loss: torch.Tensor, batch: int, batch_first: bool) -> None:
    """A per-example loss vector must have one entry per example the selected modules saw."""
    if loss.dim() == 0 or loss.shape[0] == batch:
        return
    dim = 0 if batch_first else 1
    raise ValueError(
        f"loss_fn returned {loss.shape[0]} losses, but the selected modules saw a batch of {batch} "
        f"(dimension {dim} of their outputs, batch_first={batch_first}). Return one loss per "
        "example, shape (B,), or a scalar: reduce every other dimension (per-token losses (B, T) "
        f"need .mean(dim=1), not .mean(dim=0)); if the batch is dimension {1 - dim} of the "
        f"activations, pass batch_first={not batch_first}."
    )


def _selected_params(target_modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in target_modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _enclosing(model: nn.Module, owners) -> list[nn.Module]:
    """Every module that contains an owner of selected parameters (the loop layers among them):
    :mod:`sdi.steps` finds the loop passes from their calls as well."""
    parent: dict[nn.Module, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parent.setdefault(child, module)
    out: dict[nn.Module, None] = {}
    for module in owners:
        while module in parent:
            module = parent[module]
            out[module] = None
    return list(out)


class Featurizer:
    """Hooks + rules + layout for one model and one parameter selection.

    Args:
        model: the whole model (``loss_fn(model, batch)`` runs it).
        target_modules: module(s) whose trainable parameters are analysed.
        projection_size, seed, backend: the sketch; ``projection_size=None`` means exact gradients.
        loss_reduction: ``"sum"`` or ``"mean"``: how a per-example loss vector is reduced, or how a
            scalar loss was reduced over the batch (``"mean"`` grads are rescaled by ``B``).
        batch_first: whether dimension 0 (else 1) of activations is the batch.
        expected_steps, allow_mixed_steps: see :func:`sdi.steps.plan_steps`.
        strict: refuse what has no well-defined per-example gradient: modules whose forward
            changes their buffers (batch norm in training mode, ...), and forwards that the
            generic rule's per-example recompute does not reproduce.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        target_modules: nn.Module | Sequence[nn.Module],
        projection_size: int | None,
        seed: int = 0,
        backend=None,
        loss_reduction: str = "sum",
        batch_first: bool = True,
        expected_steps: int | None = None,
        allow_mixed_steps: bool = False,
        strict: bool = True,
    ):
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        if isinstance(target_modules, nn.Module):
            target_modules = [target_modules]
        self.model = model
        self.loss_reduction = loss_reduction
        self.batch_first = bool(batch_first)
        self.expected_steps = expected_steps
        self.allow_mixed_steps = bool(allow_mixed_steps)
        self.strict = bool(strict)
        self.step_plan: StepPlan | None = None  # of the last forward pass

        selected = _selected_params(list(target_modules))
        if not selected:
            raise ValueError(
                "target_modules hold no trainable parameters (all have requires_grad=False, or "
                "the modules own none): select the modules whose parameters you want analysed, "
                "with requires_grad=True"
            )
        devices = {p.device for p in selected}
        if len(devices) > 1:
            raise ValueError(
                f"selected parameters span several devices: {sorted(map(str, devices))}: move "
                "the model to one device (model.to(device)) before building the estimator"
            )
        names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(p, name)
        missing = [p for p in selected if p not in names]
        if missing:
            raise ValueError(
                "target_modules hold parameters that are not parameters of model: pass modules "
                "of the very model object that loss_fn runs (not of a copy)"
            )

        # Owning modules in model order: the order the hash tables are drawn in.
        selected_set = set(selected)
        owner: dict[nn.Parameter, tuple[str, nn.Module]] = {}
        self._module_params: dict[nn.Module, list[nn.Parameter]] = {}
        module_rules = {}
        for module_name, module in model.named_modules():
            direct = [p for p in module.parameters(recurse=False) if p in selected_set]
            for p in direct:
                if p in owner:
                    raise ValueError(
                        f"parameter {names[p]!r} is owned by two selected modules ({owner[p][0]!r} "
                        f"and {module_name!r}): sdi pairs each parameter with one module's calls. "
                        "Select only one of them, or let one module own the parameter"
                    )
                module_rules[module] = check_supported(
                    module, module_name, p, names[p], strict=strict, exact=projection_size is None
                )
                owner[p] = (module_name, module)
            if direct:
                self._module_params[module] = direct

        draw_order = [p for params in self._module_params.values() for p in params]
        if projection_size is None:
            self.rules = ExactRules(rules=module_rules)
        else:
            draw_owners = [m for m, params in self._module_params.items() for _ in params]
            self.rules = SketchRules(
                draw_order, projection_size, seed, backend, draw_owners, module_rules
            )

        self.blocks: list[ParamBlock] = []
        start = 0
        for p in selected:
            width = self.rules.width(p)
            shape = tuple(p.shape) if self.rules.exact else (width,)
            self.blocks.append(
                ParamBlock(names[p], p, owner[p][1], slice(start, start + width), shape)
            )
            start += width
        self.width = start
        self.projection_size = projection_size
        self._columns = {b.param: b.columns for b in self.blocks}
        self.device = next(iter(devices))
        check_features_fit(**self._size_of_features())  # one example at one step must fit
        self._pass: _Pass | None = None
        self._closed = False
        self._warned_scalar_sum = self._said_no_step = False  # once per call (start_call)
        self.hooks = HookManager(
            list(self._module_params),
            self._on_grad,
            batch_dim=0 if self.batch_first else 1,
            span_modules=_enclosing(model, self._module_params),  # they time the passes
            keep_output=[m for m, r in module_rules.items() if strict and r.keeps_output],
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the hooks (the featuriser cannot be used again)."""
        return self._closed

    def close(self) -> None:
        self.hooks.close()
        self._closed = True

    def start_call(self) -> None:
        """Begin one public call (``influence_across_checkpoints``, ...): check the estimator is
        open, and let this call's once-per-call warnings be said again."""
        self.check_open()
        self._warned_scalar_sum = self._said_no_step = False

    def check_open(self) -> None:
        """``RuntimeError`` if :meth:`close` was called."""
        if self._closed:
            raise RuntimeError(
                "this estimator was closed (close() removed its hooks from the model): create a "
                "new estimator to compute more features"
            )

    def compute_batch(
        self,
        batch: Any,
        loss_fn: LossFn,
        *,
        sum_steps: bool = False,
        on_losses: Callable[[torch.Tensor], Any] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Features of one batch: ``((B, steps, D) or (B, D), steps)``, fp32 on the model's device.

        ``loss_fn`` must return per-example losses ``(B,)``, with ``B`` the batch the selected
        modules saw, or a scalar; a batch of no example is refused. ``on_losses`` is called with
        the detached per-example losses ``(B,)`` (a scalar loss repeated ``B`` times): for the
        report of non-finite losses (:class:`sdi.validation.NonFiniteRows`).
        """
        per_step, summed, steps = self._compute(batch, loss_fn, not sum_steps, sum_steps, on_losses)
        return (summed if sum_steps else per_step), steps

    def compute_batch_both(
        self,
        batch: Any,
        loss_fn: LossFn,
        *,
        on_losses: Callable[[torch.Tensor], Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``((B, steps, D), (B, D), steps)``: both results of :meth:`compute_batch` from one
        forward and backward, each bitwise equal to its own call (``sum_steps=False`` / ``True``).

        Every use is featurised both ways, as each call would do it (per-use features into the
        per-step tensor, and the rules' step sums -- with their own gradient buffers -- for the
        sum): only the forward and backward are shared. For a set that is both train and query.
        """
        return self._compute(batch, loss_fn, True, True, on_losses)

    def _compute(
        self,
        batch: Any,
        loss_fn: LossFn,
        per_step: bool,
        summed: bool,
        on_losses: Callable[[torch.Tensor], Any] | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """``(per-step features or None, summed features or None, steps)`` of one batch."""
        self.check_open()
        # Every parameter frozen: backward computes activation grads only, no weight-grad matmul.
        params = list(self.model.parameters())
        with requires_grad_set(params, False), self.hooks.capture() as log:
            per_example = _check_loss(loss_fn(self.model, batch))
            unused = {b.name: b.module for b in self.blocks if not log.uses.get(b.module)}
            if unused:  # why (sdi.diagnose), or a batch no selected module ran for: zero rows
                return self._without_uses(
                    unused, batch, loss_fn, per_example, per_step, summed, on_losses
                )
            try:
                plan = plan_steps(
                    log,
                    {b.name: b.module for b in self.blocks},
                    expected_steps=self.expected_steps,
                    allow_mixed_steps=self.allow_mixed_steps,
                )
            except RuntimeError as err:
                root = [b.name for b in self.blocks if b.module is self.model]
                if root:
                    why = "the root's one call spans every loop pass, so its use has no step"
                    raise root_selection_error(self.model, root, why) from err
                raise
            self.step_plan = plan
            if self.strict and log.mutated_buffers:
                module, buffers = next(iter(log.mutated_buffers.items()))
                param = next(b.name for b in self.blocks if b.module is module)
                raise NotImplementedError(
                    f"parameter {param!r}: the forward of its module ({type(module).__name__}) "
                    f"changed its buffers {buffers}, so its per-example gradients are not defined "
                    "in strict mode (pass strict=False to ignore the buffers)"
                )
            if len(log.batch_sizes) != 1:
                raise RuntimeError(
                    f"selected modules saw different batch sizes {sorted(log.batch_sizes)} along "
                    f"dimension {0 if self.batch_first else 1} of their outputs "
                    f"(batch_first={self.batch_first}): every selected module must see the batch "
                    "on that dimension; check batch_first, or select modules of one layout"
                )
            B = log.batch_sizes.pop()
            _check_loss_length(per_example, B, self.batch_first)
            if B == 0:
                raise ValueError(
                    "the selected modules saw a batch of 0 examples: sdi refuses empty batches "
                    "(drop them from the loader)"
                )
            if on_losses is not None:
                on_losses(per_example.detach().expand(B))
            if per_example.dim() == 0:
                if self.loss_reduction == "sum" and not self._warned_scalar_sum:
                    self._warned_scalar_sum = True
                    warn_outside_package(SCALAR_SUM_LOSS, UserWarning)
                loss = per_example
            else:
                loss = per_example.sum() if self.loss_reduction == "sum" else per_example.mean()
            # Per-step features, the step sum, or both (a set that is both train and query).
            steps_held = (plan.steps if per_step else 0) + (1 if summed else 0)
            check_features_fit(**self._size_of_features(), batch=B, steps=steps_held)
            zeros = partial(torch.zeros, dtype=torch.float32, device=self.device)
            out = zeros(B, plan.steps, self.width) if per_step else None
            out_sum = zeros(B, self.width) if summed else None
            if not loss.requires_grad:
                raise RuntimeError(
                    "the loss does not depend on the outputs of the selected modules: loss_fn "
                    "must compute the loss from this call of the model (not a detached or cached "
                    "value), through the target_modules"
                )
            scale = float(B) if self.loss_reduction == "mean" else 1.0
            # Rules with step sums hash each parameter once per pass instead of once per use;
            # next to per-step features they sum into buffers of their own (``separate``).
            step_sums = getattr(self.rules, "step_sums", None) if summed else None
            sums = step_sums(separate=per_step) if step_sums is not None else None
            self._pass = _Pass(plan, out, out_sum, scale, sums)
            try:
                loss.backward()
            finally:
                self._pass = None
            if sums is not None:
                for p, feature in sums.sketches():
                    out_sum[:, self._columns[p]] += feature
        return out, out_sum, plan.steps

    def _size_of_features(self) -> dict:
        """What :func:`sdi.sizes.check_features_fit` needs besides the batch and steps."""
        return dict(
            width=self.width,
            params=len(self.blocks),
            projection_size=self.projection_size,
            device=self.device,
        )

    def _without_uses(self, unused, batch, loss_fn, per_example, per_step, summed, on_losses):
        """Features of a batch in which the selected parameters in ``unused`` saw no use: an
        error saying why (:func:`sdi.diagnose.unused_error`), or, when no selected module ran at
        all (a loop halted before its first step), zero features as :meth:`_compute` returns
        them: ``((B, steps, D) or None, (B, D) or None, steps)``."""
        with self.hooks.paused():
            error = unused_error(self.model, unused, lambda: loss_fn(self.model, batch))
        if error is not None:
            raise error
        if len(unused) < len(self.blocks):
            raise never_ran_error(
                list(unused), [b.name for b in self.blocks if b.name not in unused]
            )
        if per_example.dim() == 0:
            raise ValueError(
                "no selected module ran for this batch and loss_fn returned a scalar, so its "
                "number of examples is unknown: return per-example losses (B,)"
            )
        batch_size = per_example.shape[0]
        last = self.step_plan.steps if self.step_plan is not None else 0
        steps = self.expected_steps if self.expected_steps is not None else last
        if not self._said_no_step:
            self._said_no_step = True
            warn_outside_package(no_step_warning(batch_size, steps), RuntimeWarning)
        if on_losses is not None:
            on_losses(per_example.detach())
        modules = {b.module: [] for b in self.blocks}
        self.step_plan = StepPlan(steps, modules, [f"pass {t}" for t in range(steps)])
        zeros = partial(torch.zeros, dtype=torch.float32, device=self.device)
        out = zeros(batch_size, steps, self.width) if per_step else None
        out_sum = zeros(batch_size, self.width) if summed else None
        return out, out_sum, steps

    @torch.no_grad()
    def _on_grad(self, module: nn.Module, use: int, call: Call, grad: torch.Tensor) -> None:
        state = self._pass
        if state is None:  # a backward outside compute_batch (e.g. a retained graph): not ours
            return
        if state.scale != 1.0:  # undo the mean over the batch: features are per-example gradients
            grad = grad * state.scale
        activations = call.tensors
        if not self.batch_first:
            grad = grad.movedim(1, 0)
            activations = [a.movedim(1, 0) if a.dim() > 1 else a for a in activations]
        params = self._module_params[module]
        batch_dim = 0 if self.batch_first else 1
        # The sum takes per-use features only where the rules keep no step sums (exact rules).
        sum_per_use = state.out_sum is not None and state.sums is None
        try:
            with self.hooks.paused():  # a rule may re-run the module's forward
                if state.sums is not None:
                    state.sums.add(module, params, activations, grad, call, batch_dim)
                if state.out is None and not sum_per_use:
                    return
                features = self.rules.features(module, params, activations, grad, call, batch_dim)
        except RuntimeError as err:  # name the culprit: the rules know the module, not its name
            names = [b.name for b in self.blocks if b.module is module]
            raise RuntimeError(f"parameters {names} ({type(module).__name__}): {err}") from err
        slot = state.plan.slots[module][use]
        for p, feature in zip(params, features, strict=True):
            columns = self._columns[p]
            if sum_per_use:
                state.out_sum[:, columns] += feature
            if state.out is not None:
                state.out[:, slot, columns] += feature

    def feature_set(self, flat: torch.Tensor, steps: int) -> FeatureSet:
        """View a ``(N, steps, D)`` feature tensor as the per-parameter dict of :class:`FeatureSet`."""
        n = flat.shape[0]
        return FeatureSet(
            {b.name: flat[:, :, b.columns].reshape(n, steps, *b.shape) for b in self.blocks}, steps
        )
