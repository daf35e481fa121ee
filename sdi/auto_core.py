"""``target_modules="auto"``: find the looped core of a model from one forward pass.

The looped core is what SDI decomposes: the modules whose parameters are reused at every loop step.
:func:`find_looped_core` runs ``loss_fn(model, batch)`` once (no backward) under a
:class:`sdi.auto_trace.CallTrace`: every module's calls made while gradients are enabled
(iterations under ``torch.no_grad()`` leave no gradient and are no step), and which calls computed
with trainable parameters, seen at the operation. It keeps

- the modules that ran more than once and own trainable parameters or computed with any during
  their calls: a block passed bank slices or a parent's weight (``BankUNetGPT``'s band), a block
  calling its children's weights functionally (``F.linear(x, self.proj.weight)``) -- the uses the
  featuriser counts for a selected module (README, "Steps and parameter rules");
- outermost first: a repeated module inside a repeated module (ALBERT's attention inside its shared
  layer group, a gate inside a loop layer) belongs to the outer one and is not a candidate.

If every outermost candidate ran the same number of times, they are the core (one module for a
weight-tied block, the layers of a multi-layer loop); the model's order is kept. If they ran
different numbers of times (HRM-text's ``L_module`` and ``H_module``), which one is meant cannot be
told from the forward pass: :class:`AmbiguousCoreError` lists the candidates with their use counts
and says how to choose one. The steps of the core's module calls are planned as the estimators plan
them (:func:`sdi.steps.plan_steps`) and come back as a :class:`sdi.steps.StepPlan`; the featuriser
replaces that plan with the one of its captured uses on its first forward.

A loop with no repeated module call (``F.linear(x, self.w)`` in a Python loop of the model's own
forward) is reported as "no looped core found"; pass ``target_modules`` explicitly there.

The estimators take ``target_modules="auto"`` (:class:`PendingFeaturizer`): they resolve it on the
first call that has data, from the first batch of its query loader (``loader`` for
``featurize_loader``), before any checkpoint is loaded, and print the chosen core and its step plan
to stderr. ``estimator.step_plan`` shows it from then on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .auto_trace import CallTrace
from .featurize import Featurizer
from .steps import StepPlan, plan_steps

AUTO = "auto"
_SHOWN = 20  # candidates listed in an error


class AmbiguousCoreError(ValueError):
    """Several outermost repeated modules ran different numbers of times: choose one."""


class NoLoopedCoreError(ValueError):
    """No module computing with trainable parameters ran more than once in the forward pass."""


@dataclass(frozen=True)
class LoopedCore:
    """The detected core: ``modules`` (model order) named ``names``, each run ``uses`` times with
    gradients in one forward pass, and the :class:`StepPlan` of their parameters."""

    modules: list[nn.Module]
    names: list[str]
    uses: int
    plan: StepPlan

    def describe(self) -> str:
        """The chosen modules and the step plan, as printed when ``"auto"`` resolves."""
        chosen = ", ".join(self.names)
        return (
            f"looped core (target_modules='auto'): {chosen} -- {self.uses} uses each\n{self.plan}"
        )

    def __str__(self) -> str:
        return self.describe()


def is_auto(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules == AUTO


def _ancestors(model: nn.Module) -> dict[nn.Module, set[nn.Module]]:
    """Every module -> the modules that contain it, over every path it is registered under."""
    parents: dict[nn.Module, set[nn.Module]] = {}
    for module in model.modules():
        for child in module.children():
            parents.setdefault(child, set()).add(module)
    found: dict[nn.Module, set[nn.Module]] = {}

    def walk(module: nn.Module) -> set[nn.Module]:
        if module not in found:
            found[module] = set()  # a cycle (never in a valid module tree) stops here
            for parent in parents.get(module, ()):
                found[module] |= {parent} | walk(parent)
        return found[module]

    for module in model.modules():
        walk(module)
    return found


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _format(rows: list[tuple[str, nn.Module, int]]) -> str:
    width = max(len(n) for n, _, _ in rows[:_SHOWN])
    lines = [
        f"  {name:<{width}}  {type(m).__name__}: {count} uses" for name, m, count in rows[:_SHOWN]
    ]
    if len(rows) > _SHOWN:
        lines.append(f"  ... and {len(rows) - _SHOWN} more")
    return "\n".join(lines)


def find_looped_core(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    allow_mixed_steps: bool = False,
) -> LoopedCore:
    """The looped core of ``model``, from one run of ``loss_fn(model, batch)`` (no backward).

    Runs in eval mode with gradients enabled (restoring every module's train/eval mode afterwards).
    Raises :class:`AmbiguousCoreError` when the outermost repeated modules ran different numbers
    of times, :class:`NoLoopedCoreError` when none ran twice (see the module docstring).
    """
    names = {m: n for n, m in model.named_modules()}
    training = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, no batch-norm statistics updated by this look at the model
    try:
        with CallTrace(model) as trace, torch.enable_grad():
            loss_fn(model, batch)
    finally:
        for module, mode in training.items():
            module.training = mode
    log = trace.log
    counts = {m: len(s) for m, s in log.spans.items()}
    if counts.get(model, 0) > 1:
        raise ValueError(
            f"loss_fn ran the whole model {counts[model]} times on one batch: the looped core is "
            "found from one forward pass, so loss_fn must call the model once"
        )
    parametric = {m for m in counts if _trainable(m) or m in trace.computing}
    repeated = {m for m in parametric if counts[m] > 1 and m is not model}
    ancestors = _ancestors(model)
    outer = [m for m in names if m in repeated and not (ancestors[m] & repeated)]
    if not outer:
        raise NoLoopedCoreError(
            f"no module that computes with trainable parameters ran more than once (with "
            f"gradients) in one forward pass of {type(model).__name__}: target_modules='auto' "
            "finds loops of module calls only. If the loop applies its weights outside any "
            "repeated module call (F.linear(x, self.w) in a Python loop of the model's own "
            "forward) or runs under torch.no_grad(), pass target_modules explicitly (the modules "
            "whose parameters the loop reuses)."
        )
    distinct = sorted({counts[m] for m in outer})
    if len(distinct) > 1:
        rows = sorted(((names[m], m, counts[m]) for m in outer), key=lambda r: (-r[2], r[0]))
        raise AmbiguousCoreError(
            f"target_modules='auto' found {len(outer)} looped parts of {type(model).__name__} "
            f"that run different numbers of times ({distinct}) in one forward pass:\n"
            f"{_format(rows)}\n"
            "SDI decomposes one loop at a time: choose one, in Python "
            f"target_modules=model.get_submodule({rows[0][0]!r}), on the command line "
            f"--target-modules {rows[0][0]} (several modules of one loop: comma-separated names)."
        )
    # The plan shown at resolution: per module of the core that computed with parameters, its
    # calls. The featuriser replaces it with the plan of its captured uses (functional uses and
    # bank slices keyed as sdi.capture keys them) on its first forward.
    planned = [m for m in names if m in parametric and (m in outer or ancestors[m] & set(outer))]
    log.entries = {m: [[a, b, None] for a, b in log.spans[m]] for m in planned}
    try:
        plan = plan_steps(
            log,  # type: ignore[arg-type]  # the CallLog fields plan_steps reads
            {m: names[m] for m in planned},
            expected_steps=None,
            allow_mixed_steps=allow_mixed_steps,
        )
    except RuntimeError as err:
        chosen = ", ".join(names[m] for m in outer)
        raise ValueError(f"the looped core found ({chosen}) has no step plan: {err}") from err
    return LoopedCore(outer, [names[m] for m in outer], distinct[0], plan)


def first_batch(loader: Iterable[Any], name: str) -> Any:
    """The first batch of a re-iterable ``loader`` (a one-shot iterator would lose it)."""
    if isinstance(loader, Iterator) or not isinstance(loader, Iterable):
        raise TypeError(
            f"target_modules='auto' reads the first batch of {name} to find the looped core, and "
            f"{name} is not re-iterable ({type(loader).__name__}): pass a DataLoader or a list of "
            "batches, or pass target_modules explicitly (sdi.find_looped_core(model, batch, "
            "loss_fn).modules finds them)"
        )
    for batch in loader:
        return batch
    raise ValueError(f"{name} is empty: target_modules='auto' needs one batch to find the core")


class PendingFeaturizer:
    """Stands in for the estimator's featuriser until ``target_modules="auto"`` is resolved.

    ``build(modules)`` makes the real featuriser once the core is known. Before that the estimator
    can report its model, its (absent) step plan and be closed; anything else resolves first.
    """

    def __init__(self, model: nn.Module, build: Callable[[list[nn.Module]], Any], mixed: bool):
        self.model = model
        self.step_plan: StepPlan | None = None
        self.closed = False
        self._build = build
        self._mixed = mixed

    @property
    def device(self) -> torch.device:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params[0].device if params else torch.device("cpu")

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this estimator was closed: create a new estimator")

    def close(self) -> None:
        self.closed = True

    def resolve(self, loader: Iterable[Any], loss_fn: Callable, name: str):
        """Find the core from ``loader``'s first batch, print it, return the real featuriser."""
        self.check_open()
        core = find_looped_core(
            self.model, first_batch(loader, name), loss_fn, allow_mixed_steps=self._mixed
        )
        print(f"sdi: {core}", file=sys.stderr)
        featurizer = self._build(core.modules)
        featurizer.step_plan = core.plan
        return featurizer


def featurizer_for(*, target_modules: Any, **kwargs: Any):
    """``Featurizer(target_modules=..., **kwargs)``, or a :class:`PendingFeaturizer` for
    ``target_modules="auto"``."""
    if not is_auto(target_modules):
        if isinstance(target_modules, str):
            raise ValueError(
                f"target_modules={target_modules!r}: the only string accepted is 'auto'; pass "
                "modules (model.get_submodule(name)) otherwise"
            )
        return Featurizer(target_modules=target_modules, **kwargs)

    def build(modules: list[nn.Module]):
        return Featurizer(target_modules=modules, **kwargs)

    return PendingFeaturizer(kwargs["model"], build, bool(kwargs.get("allow_mixed_steps", False)))


def resolved(featurizer: Any, loader: Iterable[Any], loss_fn: Callable, name: str):
    """The estimator's featuriser, resolving a pending ``"auto"`` one from ``loader``."""
    if isinstance(featurizer, PendingFeaturizer):
        return featurizer.resolve(loader, loss_fn, name)
    return featurizer
