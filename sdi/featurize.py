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
from typing import Any

import torch
import torch.nn as nn

from .capture import CaptureMode, OpUse
from .freezing import requires_grad_set
from .hooks import Call, HookManager
from .outputs import FeatureSet
from .rules import GENERIC, RULES, ExactRules, ModuleRule, SketchRules, check_supported, rule_for
from .rules.linear import LinearRule
from .rules.ops import OpRules
from .steps import StepPlan, plan_steps
from .uses import ModuleFallback, ParamScope

_OP = ModuleRule()  # what check_supported sees for parameters captured at the operation


def _module_rule(module: nn.Module, direct, owners) -> ModuleRule | None:
    """The module-level rule serving ``module``'s ``direct`` selected parameters, or ``None``:
    captured at the operation. Module-level: registered rules (``register_rule``, also the
    generic rule registered for a type) and Opacus' samplers, where the module owns its
    parameters alone and the rule covers them; Linear and Embedding also where their forward is
    their own (their operations' rules give the same features); a Linear whose weight is
    computed (weight norm, pruning) is captured at the operation."""
    if not direct or any(len(owners[p]) > 1 for p in direct):
        return None  # a parameter shared by several modules (tied): one path for all its uses
    rule = rule_for(module)
    if rule is GENERIC and RULES.get(type(module)) is not GENERIC:
        return None
    if isinstance(rule, LinearRule) and any(rule.check(module, p, exact=True) for p in direct):
        return None  # reparametrised (weight norm, pruning): the operations see the weight
    return rule


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
    out: torch.Tensor  # (B, steps, D), or (B, D) when summing over steps
    sum_steps: bool
    scale: float
    sums: Any = None  # the rules' step-sum accumulator when summing over steps, if they have one


def _check_loss(loss: Any) -> torch.Tensor:
    """``loss_fn``'s result, refused unless it is a scalar or a vector ``(B,)`` of ``B > 0``."""
    if not torch.is_tensor(loss):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() > 1:
        raise ValueError(
            f"loss_fn must return a scalar or per-example losses (B,), got shape {tuple(loss.shape)}"
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
    """The trainable parameters of the modules, and the parameters given themselves."""
    seen: set[int] = set()
    params = []
    for module in target_modules:
        for p in [module] if isinstance(module, nn.Parameter) else module.parameters():
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
            raise ValueError("target_modules hold no trainable parameters")
        devices = {p.device for p in selected}
        if len(devices) > 1:
            raise ValueError(
                f"selected parameters span several devices: {sorted(map(str, devices))}"
            )
        names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(p, name)
        missing = [p for p in selected if p not in names]
        if missing:
            raise ValueError("target_modules hold parameters that are not parameters of model")

        # Owning modules in model order: the order the hash tables are drawn in.
        selected_set = set(selected)
        owners: dict[nn.Parameter, list[tuple[str, nn.Module]]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                if not any(m is module for _, m in owners.get(p, [])):
                    owners.setdefault(p, []).append((module_name, module))
        owner = {p: found[0] for p, found in owners.items()}
        self._module_params: dict[nn.Module, list[nn.Parameter]] = {}  # module-level rules
        module_rules, draw_order, draw_owners = {}, [], []
        for module_name, module in model.named_modules():
            direct = [p for p in module.parameters(recurse=False) if p in selected_set]
            direct = [p for p in direct if owner[p][1] is module]
            rule = _module_rule(module, direct, owners)
            for p in direct:
                module_rules[module] = check_supported(
                    module,
                    module_name,
                    p,
                    names[p],
                    strict=strict,
                    exact=projection_size is None,
                    rule=rule or _OP,
                )
                draw_order.append(p)
                draw_owners.append(module if rule is not None else None)
            if direct and rule is not None:
                self._module_params[module] = direct
            elif direct:
                module_rules.pop(module, None)

        if projection_size is None:
            self.rules = ExactRules(rules=module_rules)
        else:
            self.rules = SketchRules(
                draw_order, projection_size, seed, backend, draw_owners, module_rules
            )
        self.op_rules = OpRules(lambda: self.rules)

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
        self._columns = {b.param: b.columns for b in self.blocks}
        self.device = next(iter(devices))
        self._pass: _Pass | None = None
        self._closed = False
        targets = [m for m in target_modules if not isinstance(m, nn.Parameter)]
        op_owners = [owner[p][1] for p in selected if owner[p][1] not in self._module_params]
        every_owner = [owner[p][1] for p in selected]
        self.hooks = HookManager(
            list(self._module_params),
            self._on_grad,
            batch_dim=0 if self.batch_first else 1,
            # they time the passes, and group a module's operations into one use
            span_modules=[*op_owners, *targets, *_enclosing(model, every_owner)],
            keep_output=[m for m, r in module_rules.items() if strict and r.keeps_output],
            owners=every_owner,
            root=model,
        )
        self.scope = ParamScope(
            names=names,
            selected=selected_set,
            owners={p: o[1] for p, o in owner.items()},
            module_rule_owner={p: m for m, ps in self._module_params.items() for p in ps},
            targets=set(targets),
            hooks=self.hooks,
            on_grad=self._on_op_grad,
        )
        self._key_names = {m: n or "<model>" for n, m in model.named_modules()}
        self._seed_handle = model.register_forward_pre_hook(self._seed_inputs, with_kwargs=True)
        self._mode: CaptureMode | None = None

    def _seed_inputs(self, module, args, kwargs):
        """The model's own arguments are per-example (they come from the batch)."""
        if self._mode is not None:
            self._mode.seed((args, kwargs), 0 if self.batch_first else 1)
        return None

    def _key_name(self, key) -> str:
        if isinstance(key, tuple):
            return f"{self.scope.names([key[0]])[0]}[{key[1]}]"
        return self._key_names.get(key, type(key).__name__)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the hooks (the featuriser cannot be used again)."""
        return self._closed

    def close(self) -> None:
        self.hooks.close()
        self._seed_handle.remove()
        self._closed = True

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
        self.check_open()
        for _ in range(len(self.blocks)):
            try:
                return self._compute(batch, loss_fn, sum_steps, on_losses)
            except ModuleFallback as fallback:
                self._serve_by_generic_rule(fallback.module, fallback)
        return self._compute(batch, loss_fn, sum_steps, on_losses)

    def _serve_by_generic_rule(self, module: nn.Module, why: Exception) -> None:
        """Serve ``module``'s selected parameters by the generic module-level rule from now on
        (an operation in its forward hides the batch, so its uses are taken at the call)."""
        if module in self._module_params:
            raise RuntimeError(str(why)) from why
        params = [b.param for b in self.blocks if b.module is module]
        self.rules.use_rule(module, GENERIC)
        self._module_params[module] = params
        self.scope.module_rule_owner.update(dict.fromkeys(params, module))
        self.hooks.add_rule_module(module, keep_output=self.strict)

    def _compute(self, batch, loss_fn, sum_steps, on_losses):
        # Every parameter frozen: backward computes activation grads only, no weight-grad matmul.
        params = list(self.model.parameters())
        self.scope.trainable = {id(p) for p in params if p.requires_grad}
        bd = 0 if self.batch_first else 1
        with requires_grad_set(params, False), self.hooks.capture() as log:
            with CaptureMode(self.scope) as mode:
                self._mode = mode
                try:
                    mode.seed(batch, bd)
                    per_example = _check_loss(loss_fn(self.model, batch))
                finally:
                    self._mode = None
            unused = sorted(b.name for b in self.blocks if b.param not in log.used)
            if unused:
                raise RuntimeError(
                    f"selected parameters never used in the forward pass: {unused[:20]}. Pass "
                    "only modules the model runs, and do not run the loss under torch.no_grad()."
                )
            plan = plan_steps(
                log,
                {key: self._key_name(key) for key in log.entries},
                expected_steps=self.expected_steps,
                allow_mixed_steps=self.allow_mixed_steps,
            )
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
                    f"selected modules saw different batch sizes {sorted(log.batch_sizes)}"
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
                loss = per_example
            else:
                loss = per_example.sum() if self.loss_reduction == "sum" else per_example.mean()
            shape = (B, self.width) if sum_steps else (B, plan.steps, self.width)
            out = torch.zeros(shape, dtype=torch.float32, device=self.device)
            if not loss.requires_grad:
                raise RuntimeError(
                    "the loss does not depend on the outputs of the selected modules"
                )
            scale = float(B) if self.loss_reduction == "mean" else 1.0
            # Rules with step sums hash each parameter once per pass instead of once per use.
            step_sums = getattr(self.rules, "step_sums", None) if sum_steps else None
            sums = step_sums() if step_sums is not None else None
            self._pass = _Pass(plan, out, sum_steps, scale, sums)
            try:
                loss.backward()
            finally:
                self._pass = None
            if sums is not None:
                for p, feature in sums.sketches():
                    out[:, self._columns[p]] += feature
        return out, plan.steps

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
        try:
            with self.hooks.paused():  # a rule may re-run the module's forward
                if state.sums is not None:
                    state.sums.add(module, params, activations, grad, call, batch_dim)
                    return
                features = self.rules.features(module, params, activations, grad, call, batch_dim)
        except RuntimeError as err:  # name the culprit: the rules know the module, not its name
            names = [b.name for b in self.blocks if b.module is module]
            raise RuntimeError(f"parameters {names} ({type(module).__name__}): {err}") from err
        slot = state.plan.slots[module][use]
        for p, feature in zip(params, features, strict=True):
            columns = self._columns[p]
            if state.sum_steps:
                state.out[:, columns] += feature
            else:
                state.out[:, slot, columns] += feature

    @torch.no_grad()
    def _on_op_grad(self, use: OpUse, grad: torch.Tensor) -> None:
        """One captured use's grad-output: its rule's features into each parameter's columns."""
        state = self._pass
        if state is None:
            return
        use.check_unchanged()
        if state.scale != 1.0:
            grad = grad * state.scale
        grad = grad.movedim(use.out_dim, 0)
        shown = getattr(self.rules, "shown_grad", None)  # explain's position masks
        if shown is not None:
            grad = shown(grad)
        try:
            features = self.op_rules.features(use, grad)
        except RuntimeError as err:
            names = self.scope.names(use.params)
            raise RuntimeError(f"parameters {names} (used by {use.name}): {err}") from err
        for p, feature in features.items():
            columns = self._columns[p]
            if state.sum_steps:
                state.out[:, columns] += feature
            else:
                key, entry = use.slots[p]
                state.out[:, state.plan.slots[key][entry], columns] += feature

    def feature_set(self, flat: torch.Tensor, steps: int) -> FeatureSet:
        """View a ``(N, steps, D)`` feature tensor as the per-parameter dict of :class:`FeatureSet`."""
        n = flat.shape[0]
        return FeatureSet(
            {b.name: flat[:, :, b.columns].reshape(n, steps, *b.shape) for b in self.blocks}, steps
        )
