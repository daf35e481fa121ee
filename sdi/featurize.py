"""Per-example, per-step features of the selected parameters, computed during one backward pass.

One path: capture -> use -> rule -> feature. The :class:`Featurizer` runs the forward under the
operation-level capture (:mod:`sdi.capture`, :mod:`sdi.uses`; the calls of modules served by a
module-level rule are uses too, :mod:`sdi.hooks`), sends each use's grad-output to its rule
(:mod:`sdi.rules.ops`) and owns the layout of the feature tensor: every selected parameter owns a
block of columns, so a batch's features are one fp32 tensor ``(B, steps, D)`` -- or ``(B, D)``,
summed over steps in place, when only the full gradient is needed (TracIn, and the train side of
SDI).

Featurisation freezes every model parameter for the duration of the pass: the hooks need only the
grad-outputs of the uses, so backward skips every weight-gradient matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .capture import CaptureMode, OpUse, inputs_usable, module_use, settle_output
from .diagnose import (
    SCALAR_SUM_LOSS,
    never_ran_error,
    no_step_warning,
    root_selection_error,
    unused_error,
)
from .freezing import requires_grad_set
from .hooks import HookManager
from .outputs import FeatureSet
from .rules import GENERIC, ExactRules, SketchRules
from .rules.ops import OpRules
from .selection import NOTHING_SELECTED, Selection, enclosing, select
from .sizes import check_features_fit
from .steps import StepPlan, plan_steps
from .uses import Found, ModuleFallback, ParamScope
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
    """The backward pass in flight: each use's grad-output through its rule into its columns."""

    plan: StepPlan
    out: torch.Tensor | None  # (B, steps, D) per step, if wanted
    out_sum: torch.Tensor | None  # (B, D) summed over steps, if wanted
    scale: float
    sums: Any = None  # the rules' step-sum accumulator when summing over steps, if they have one

    @property
    def per_use(self) -> bool:
        """Whether each use's own features are needed: per step, or for a sum that the rules
        keep no step sums of (exact features)."""
        return self.out is not None or self.sums is None

    def collect_sums(self, columns: dict) -> None:
        """Add the step sums the rules kept (hashed once per pass) to the summed features."""
        if self.sums is not None:
            for p, feature in self.sums.sketches():
                self.out_sum[:, columns[p]] += feature

    def _add(self, columns: slice, slot: int, feature: torch.Tensor) -> None:
        if self.out is not None:
            self.out[:, slot, columns] += feature
        if self.out_sum is not None and self.sums is None:
            self.out_sum[:, columns] += feature

    def use_grad(self, f: Featurizer, use: OpUse, grad: torch.Tensor) -> None:
        """One use (:mod:`sdi.capture`): an operation, or a call of a module-level rule's module."""
        if torch.is_grad_enabled():  # only under create_graph=True: the rules record no graph
            with torch.no_grad():
                return self.use_grad(f, use, grad)
        use.check_unchanged()
        if self.scale != 1.0:
            grad = grad * self.scale
        if use.out_dim != 0:
            grad = grad.movedim(use.out_dim, 0)
        shown = getattr(f.rules, "shown_grad", None)  # explain's position masks
        if shown is not None:  # the positions' dimension, once the batch's is first
            pos = use.pos_dim
            grad = shown(grad, pos if pos is None or pos > use.out_dim else pos + 1)
        try:
            # (the backward runs with the hooks paused: a rule re-running a forward records nothing)
            if self.sums is not None:  # what the sums do not hold goes to the sum directly
                for p, feature in f.op_rules.features(use, grad, self.sums).items():
                    self.out_sum[:, f._columns[p]] += feature
            features = f.op_rules.features(use, grad) if self.per_use else {}
        except RuntimeError as err:
            names = f.scope.names(use.params)
            what = use.name if use.module is not None else f"used by {use.name}"
            raise RuntimeError(f"parameters {names} ({what}): {err}") from err
        for p, feature in features.items():
            key, entry = use.slots[p]
            self._add(f._columns[p], self.plan.slots[key][entry], feature)
        use.release()


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


def _batch_loss(per_example: torch.Tensor, B: int, batch_first: bool, reduction: str):
    """The scalar to run backward on, after checking ``per_example`` against the batch ``B``."""
    _check_loss_length(per_example, B, batch_first)
    if B == 0:
        raise ValueError(
            "the selected modules saw a batch of 0 examples: sdi refuses empty batches "
            "(drop them from the loader)"
        )
    if per_example.dim() == 0:
        loss = per_example
    else:
        loss = per_example.sum() if reduction == "sum" else per_example.mean()
    if not loss.requires_grad:
        raise RuntimeError(
            "the loss does not depend on the outputs of the selected modules: loss_fn "
            "must compute the loss from this call of the model (not a detached or cached "
            "value), through the target_modules"
        )
    return loss


def _check_log(log, blocks: list[ParamBlock], strict: bool, batch_dim: int) -> int:
    """The batch size the uses saw; refuse a forward that changed a selected module's buffers
    (strict), or mixed batch sizes."""
    if strict and log.mutated_buffers:
        module, buffers = next(iter(log.mutated_buffers.items()))
        param = next(b.name for b in blocks if b.module is module)
        raise NotImplementedError(
            f"parameter {param!r}: the forward of its module ({type(module).__name__}) "
            f"changed its buffers {buffers}, so its per-example gradients are not defined "
            "in strict mode (pass strict=False to ignore the buffers)"
        )
    if len(log.batch_sizes) != 1:
        raise RuntimeError(
            f"selected modules saw different batch sizes {sorted(log.batch_sizes)} along "
            f"dimension {batch_dim} of their outputs (batch_first={batch_dim == 0}): every "
            "selected module must see the batch on that dimension; check batch_first, or select "
            "modules of one layout"
        )
    return log.batch_sizes.pop()


def _capture(f: Featurizer, chosen) -> tuple[HookManager, ParamScope]:
    """The hook manager and the capture scope of a featuriser."""
    owner = chosen.owner
    op_owners = [owner[p][1] for p in chosen.params if owner[p][1] not in f._module_params]
    every_owner = [owner[p][1] for p in chosen.params]
    hooks = HookManager(
        list(f._module_params),
        f._on_grad,
        f._module_use,
        batch_dim=0 if f.batch_first else 1,
        # they time the passes, and group a module's operations into one use
        span_modules=[*op_owners, *chosen.targets, *enclosing(f.model, every_owner)],
        keep_output=[m for m, r in chosen.module_rules.items() if f.strict and r.keeps_output],
        owners=every_owner,
        root=f.model,
        on_call=partial(_settle_call, f),
        on_output=partial(_settle_output, f),
    )
    scope = ParamScope(
        names=chosen.names,
        selected=set(chosen.params),
        owners={p: o[1] for p, o in owner.items()},
        module_rule_owner={p: m for m, ps in f._module_params.items() for p in ps},
        targets=set(chosen.targets),
        hooks=hooks,
        on_grad=f._on_grad,
        strict=f.strict,
    )
    bd = 0 if f.batch_first else 1
    scope.inputs_usable = lambda inputs: f._mode is not None and inputs_usable(f._mode, inputs, bd)
    return hooks, scope


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
        self.model = model
        self.loss_reduction = loss_reduction
        self.batch_first = bool(batch_first)
        self.expected_steps = expected_steps
        self.allow_mixed_steps = bool(allow_mixed_steps)
        self.strict = bool(strict)
        self.step_plan: StepPlan | None = None  # of the last forward pass

        self._targets, self._sketch = target_modules, (projection_size, seed, backend)
        self._fallbacks: list[nn.Module] = []
        self._derivations: dict = {}  # shared by the batches' captures (sdi.capture.CaptureMode)
        chosen = _lay_out(self, [])
        self.device = _device(model, chosen)
        self._pass: _Pass | None = None
        self._closed = False
        self.hooks, self.scope = _capture(self, chosen)
        check_features_fit(**_feature_size(self))  # one example at one step must fit
        self._warned_scalar_sum = self._said_no_step = False  # once per call (start_call)
        self._seed_handle = model.register_forward_pre_hook(self._seed_inputs, with_kwargs=True)
        self._mode: CaptureMode | None = None
        self._seed_model_args = False
        # The batch's tensors' batch dimension: the activations' (batch_first) until a selected
        # module's output shows that the loader's layout is the other one (SeedLayout).
        self._seed_dim = 0 if self.batch_first else 1

    def _seed_inputs(self, module, args, kwargs):
        """A batch holding no tensor (``loss_fn`` builds them, say by tokenising): the model's
        tensor arguments are the per-example seeds instead. Otherwise the data flow from the
        batch's tensors decides (a shared table passed to the model is not per-example)."""
        if self._mode is not None and self._seed_model_args:
            self._mode.seed((args, kwargs), self._seed_dim)
        return None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the hooks (the featuriser cannot be used again)."""
        return self._closed

    def close(self) -> None:
        self.hooks.close()
        self._seed_handle.remove()
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
        per_step, summed, steps = self._featurize(batch, loss_fn, not sum_steps, on_losses)
        return (summed if sum_steps else per_step), steps

    def compute_batch_both(
        self, batch: Any, loss_fn: LossFn, *, on_losses: Callable[[torch.Tensor], Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``((B, steps, D), (B, D), steps)``: both results of :meth:`compute_batch` from one
        forward and backward, each bitwise equal to its own call (``sum_steps=False`` / ``True``):
        every use is featurised both ways, as each call would (per-use features, and the rules'
        step sums with gradient buffers of their own). For a set that is both train and query."""
        return self._featurize(batch, loss_fn, True, on_losses, summed=True)

    def _featurize(self, batch, loss_fn, per_step: bool, on_losses, summed: bool | None = None):
        """``(per-step features or None, summed features or None, steps)``; ``summed`` defaults
        to ``not per_step``. Re-runs the batch when the capture finds a parameter to add."""
        self.check_open()
        summed = not per_step if summed is None else summed
        flipped = False
        while True:  # at most twice per parameter of the model, and once for the seeds' layout
            try:
                out = self._compute(batch, loss_fn, per_step, summed, on_losses)
                self.scope.frozen_layout = True
                return out
            except SeedLayout as layout:
                flipped = _flip_seeds(self, layout, flipped)
            except ModuleFallback as fallback:
                self._fallbacks.append(fallback.module)
                _serve_by_generic_rule(self, fallback.module, fallback)
            except Found as found:
                self.scope.found.add(found.param)
                _lay_out(
                    self,
                    [b.param for b in self.blocks if b.param in self.scope.found] + [found.param],
                )

    def _compute(self, batch, loss_fn, per_step: bool, summed: bool, on_losses):
        # Every parameter frozen: backward computes activation grads only, no weight-grad matmul.
        params = list(self.model.parameters())
        self.scope.trainable = {id(p) for p in params if p.requires_grad}
        bd = 0 if self.batch_first else 1
        with requires_grad_set(params, False), self.hooks.capture() as log:
            explain = hasattr(self.rules, "shown_grad")  # its position masks: follow the positions
            with CaptureMode(self.scope, self._derivations, positions=explain) as mode:
                self._mode = mode
                try:
                    self._seed_model_args = mode.seed(batch, self._seed_dim) == 0
                    per_example = _check_loss(loss_fn(self.model, batch))
                finally:
                    self._mode = None
            if not self.blocks:  # parameterless modules whose calls used no parameter
                raise ValueError(NOTHING_SELECTED)
            unused = {b.name: b.module for b in self.blocks if b.param not in log.used}
            if unused:  # why (sdi.diagnose), or a batch no selected module ran for: zero rows
                return _without_uses(
                    self, unused, batch, loss_fn, per_example, per_step, summed, on_losses
                )
            plan = self.step_plan = _plan(self, log)
            B = _check_log(log, self.blocks, self.strict, bd)
            loss = _batch_loss(per_example, B, self.batch_first, self.loss_reduction)
            if on_losses is not None:
                on_losses(per_example.detach().expand(B))
            if per_example.dim() == 0 and self.loss_reduction == "sum":
                _warn_scalar_sum(self)
            state = self._pass = _new_pass(self, plan, B, per_step, summed)
            try:
                # A recompute in backward (checkpointing, a rule re-running a forward) is no use.
                with self.hooks.paused():
                    loss.backward()
            finally:
                self._pass = None
            state.collect_sums(self._columns)
        return state.out, state.out_sum, plan.steps

    def _module_use(self, module: nn.Module, args, kwargs, dim: int, batch: int, out) -> OpUse:
        params = self._module_params[module]
        if self._mode.calls is not None:  # explain: the use's positions, before it is made
            self._mode.calls.settle(module, out, leave=False)
        return module_use(self._mode, module, params, args, kwargs, dim, batch, out)

    def _on_grad(self, use: OpUse, grad: torch.Tensor) -> None:
        if self._pass is not None:  # else a backward outside compute_batch: not ours
            self._pass.use_grad(self, use, grad)

    def feature_set(self, flat: torch.Tensor, steps: int) -> FeatureSet:
        """View a ``(N, steps, D)`` feature tensor as the per-parameter dict of :class:`FeatureSet`."""
        n = flat.shape[0]
        return FeatureSet(
            {b.name: flat[:, :, b.columns].reshape(n, steps, *b.shape) for b in self.blocks}, steps
        )


def _settle_call(f: Featurizer, module: nn.Module, inputs: tuple) -> None:
    """A hooked module's call begins: its per-example inputs are held to the declared layout
    where the data flow lost their batch (:func:`sdi.capture.settle_output`)."""
    if f._mode is not None:
        bd = 0 if f.batch_first else 1
        args, kwargs = inputs
        tensors = [
            x
            for a in (*args, *kwargs.values())
            for x in ((a,) if isinstance(a, torch.Tensor) else tree_flatten(a)[0])
            if isinstance(x, torch.Tensor)
        ]
        for x in tensors:
            settle_output(f._mode, x, x, bd)
        if f._mode.calls is not None:  # explain: where this call's input has its positions
            f._mode.calls.enter(module, tensors)


def _settle_output(f: Featurizer, module: nn.Module, out: torch.Tensor, new: torch.Tensor) -> None:
    """A hooked module's output (``new`` handed on in its place): held to the declared layout
    likewise; a selected module's must have the batch on the declared dimension (by the data
    flow, where it knows)."""
    if f._mode is None:
        return
    bd = 0 if f.batch_first else 1
    if f._mode.calls is not None:  # explain: positions the data flow lost inside the call
        f._mode.calls.settle(module, out, leave=True)
    dim = settle_output(f._mode, out, new, bd)
    if dim is not None and dim != bd and module in f.scope.targets:
        raise SeedLayout(module, dim)


def _lay_out(f: Featurizer, found: list) -> Selection:
    """Select, draw the tables, lay the columns out (again when parameters were ``found``)."""
    m, seed, backend = f._sketch
    chosen = select(f.model, f._targets, strict=f.strict, exact=m is None, found=found)
    f._module_params = chosen.module_params  # modules served by module-level rules
    if m is None:
        f.rules = ExactRules(rules=chosen.module_rules)
    else:
        f.rules = SketchRules(
            chosen.draw_order, m, seed, backend, chosen.draw_owners, chosen.module_rules
        )
    f.op_rules = OpRules(lambda: f.rules)
    f.blocks = _blocks(f.rules, chosen)
    f.width = f.blocks[-1].columns.stop if f.blocks else 0
    f._columns = {b.param: b.columns for b in f.blocks}
    for module in f._fallbacks:
        _serve_by_generic_rule(f, module, None)
    return chosen


def _device(model: nn.Module, chosen: Selection) -> torch.device:
    """The selected parameters' device; the model's where the selected modules own none (the
    parameters their calls use are found by the first forward)."""
    params = chosen.params or list(model.parameters())
    return params[0].device if params else torch.device("cpu")


def _feature_size(f: Featurizer) -> dict:
    """What :func:`sdi.sizes.check_features_fit` needs of a featuriser besides batch and steps."""
    projection_size = None if f.rules.exact else f.rules.m
    return dict(
        width=f.width, params=len(f.blocks), projection_size=projection_size, device=f.device
    )


def _without_uses(f: Featurizer, unused, batch, loss_fn, per_example, per_step, summed, on_losses):
    """Features of a batch in which the selected parameters in ``unused`` (name -> owning module)
    saw no use: an error saying why (:func:`sdi.diagnose.unused_error`), or, when no selected
    module ran at all (a loop halted before its first step), zero features as
    :meth:`Featurizer._compute` returns them: ``((B, steps, D) or None, (B, D) or None, steps)``."""
    with f.hooks.paused():
        error = unused_error(f.model, unused, lambda: loss_fn(f.model, batch))
    if error is not None:
        raise error
    if len(unused) < len(f.blocks):
        raise never_ran_error(list(unused), [b.name for b in f.blocks if b.name not in unused])
    if per_example.dim() == 0:
        raise ValueError(
            "no selected module ran for this batch and loss_fn returned a scalar, so its "
            "number of examples is unknown: return per-example losses (B,)"
        )
    batch_size = per_example.shape[0]
    last = f.step_plan.steps if f.step_plan is not None else 0
    steps = f.expected_steps if f.expected_steps is not None else last
    if not f._said_no_step:
        f._said_no_step = True
        warn_outside_package(no_step_warning(batch_size, steps), RuntimeWarning)
    if on_losses is not None:
        on_losses(per_example.detach())
    f.step_plan = StepPlan(
        steps, {b.module: [] for b in f.blocks}, [f"pass {t}" for t in range(steps)]
    )
    zeros = partial(torch.zeros, dtype=torch.float32, device=f.device)
    out = zeros(batch_size, steps, f.width) if per_step else None
    out_sum = zeros(batch_size, f.width) if summed else None
    return out, out_sum, steps


def _blocks(rules, chosen: Selection) -> list[ParamBlock]:
    """The column block of each chosen parameter, in order: ``numel`` (exact) or ``m`` wide."""
    blocks, start = [], 0
    for p in chosen.params:
        width = rules.width(p)
        shape = tuple(p.shape) if rules.exact else (width,)
        name, owner = chosen.names[p], chosen.owner[p][1]
        blocks.append(ParamBlock(name, p, owner, slice(start, start + width), shape))
        start += width
    return blocks


def _serve_by_generic_rule(f: Featurizer, module: nn.Module, why: Exception | None) -> None:
    """Serve the selected parameters of ``module`` and its submodules (those no other
    module-level rule serves) by the generic module-level rule from now on: an operation in its
    call hides the batch, so their uses are taken at the call."""
    if why is not None and module in f._module_params:
        raise RuntimeError(str(why)) from why
    inside = set(module.modules())
    served = {p for ps in f._module_params.values() for p in ps}
    params = [b.param for b in f.blocks if b.module in inside and b.param not in served]
    f.rules.use_rule(module, GENERIC)
    f._module_params[module] = params
    f.scope.module_rule_owner.update(dict.fromkeys(params, module))
    f.hooks.add_rule_module(module, keep_output=f.strict)


def _plan(f: Featurizer, log) -> StepPlan:
    """The step plan of this forward pass; a root selection without steps is named."""
    try:
        return plan_steps(
            log,
            {key: f.scope.key_name(key) for key in log.entries},
            expected_steps=f.expected_steps,
            allow_mixed_steps=f.allow_mixed_steps,
        )
    except RuntimeError as err:
        root = [b.name for b in f.blocks if b.module is f.model]
        if root:
            why = "the root's one call spans every loop pass, so its use has no step"
            raise root_selection_error(f.model, root, why) from err
        raise


def _new_pass(f: Featurizer, plan: StepPlan, B: int, per_step: bool, summed: bool) -> _Pass:
    """The state of one backward: per-step features ``(B, steps, D)``, the step sum ``(B, D)``, or
    both (a set that is both train and query), checked to fit before they are allocated."""
    held = (plan.steps if per_step else 0) + (1 if summed else 0)
    check_features_fit(**_feature_size(f), batch=B, steps=held)
    zeros = partial(torch.zeros, dtype=torch.float32, device=f.device)
    out = zeros(B, plan.steps, f.width) if per_step else None
    out_sum = zeros(B, f.width) if summed else None
    scale = float(B) if f.loss_reduction == "mean" else 1.0
    # Rules with step sums hash each parameter once per pass instead of once per use; beside
    # per-step features they sum into gradient buffers of their own (``separate``).
    step_sums = getattr(f.rules, "step_sums", None) if summed else None
    sums = step_sums(separate=per_step) if step_sums is not None else None
    return _Pass(plan, out, out_sum, scale, sums)


class SeedLayout(Exception):
    """Raised during a forward: a selected module's output has the batch on ``dim`` by the data
    flow from the batch, not on the declared dimension."""

    def __init__(self, module: nn.Module, dim: int):
        super().__init__(f"batch on dimension {dim} of {type(module).__name__}'s output")
        self.module, self.dim = module, dim


def _flip_seeds(f: Featurizer, layout: SeedLayout, flipped: bool) -> bool:
    """Take the batch's tensors as batched on their other dimension (0 <-> 1; a sequence-first
    model fed batch-first loaders, or the reverse) and run the batch again; refuse a second flip
    for one batch. Returns ``True``."""
    if flipped:
        name = f.scope.key_name(layout.module)
        declared = 0 if f.batch_first else 1
        raise RuntimeError(
            f"selected module {name!r} ({type(layout.module).__name__}) has the batch on "
            f"dimension {layout.dim} of its output, by the data flow from the batch's tensors "
            f"taken as batched on either of their first two dimensions, but batch_first="
            f"{f.batch_first} declares dimension {declared}: pass batch_first="
            f"{not f.batch_first}, or select modules whose outputs have the declared layout"
        ) from layout
    f._seed_dim = 1 - f._seed_dim
    return True


def _warn_scalar_sum(f: Featurizer) -> None:
    """A scalar loss with ``loss_reduction="sum"``: say so once per public call."""
    if not f._warned_scalar_sum:
        f._warned_scalar_sum = True
        warn_outside_package(SCALAR_SUM_LOSS, UserWarning)
