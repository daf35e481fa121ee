"""Which step each use of each selected module fills: the :class:`StepPlan` of one forward pass.

The steps come from the forward timeline (:class:`sdi.hooks.CallLog`):

- When every selected parameter is used ``tau`` times, use ``t`` fills step ``t`` (however the uses
  interleave: the classic weight-tied loop, or several stacks each run ``tau`` times).
- Otherwise the modules used in every pass -- those with the most uses, ``tau``, among the modules
  owning selected parameters and the modules enclosing them (the loop layers) -- define the loop
  passes: pass ``p`` spans from the first to the last tick of their ``p``-th calls. Each use of a module used in
  fewer passes (a gate acting from the second pass on, an early-exit head) fills the step of the
  pass it ran in; its feature is zero in the other steps. A use between passes ``p`` and ``p + 1``
  belongs to pass ``p`` (it reads that pass's output, as an early-exit head does); a gate that runs
  first in its loop layer lies inside that layer's call, so in its own pass.
- With ``allow_mixed_steps=True``, uses before the first pass fill a *prelude* step in front of
  the passes and uses after the last one a *readout* step behind them.
- Passes that overlap (the ``tau``-times-used modules do not run pass after pass), or a use across
  a pass boundary, are ambiguous: an error that shows the use counts.

Example: the 3-pass loop of two layers in ``tests/looped_lm.py``, whose ``gate`` acts from the
second pass on, selecting the embedding, layer 0's gate and both layers' attention
(``allow_mixed_steps=True``); ``print(estimator.step_plan)`` after featurising shows::

    StepPlan: 4 steps [prelude, pass 0, pass 1, pass 2]
      embed              1 use  -> steps [0]
      layers.0.gate      2 uses -> steps [2, 3]
      layers.0.attn      3 uses -> steps [1, 2, 3]
      layers.0.attn.qkv  3 uses -> steps [1, 2, 3]
      layers.0.attn.out  3 uses -> steps [1, 2, 3]
      layers.1.attn      3 uses -> steps [1, 2, 3]
      layers.1.attn.qkv  3 uses -> steps [1, 2, 3]
      layers.1.attn.out  3 uses -> steps [1, 2, 3]

The gate's features are zero in step 1 (pass 0), where it did not run.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch.nn as nn

from .hooks import CallLog


@dataclass(frozen=True)
class StepPlan:
    """``steps`` step slots; ``slots[key]`` = the step of each use of ``key``, in forward order.

    A key is a module (its calls, or the operations using the parameters it owns) or
    ``(bank, i)`` for the slice ``bank[i]`` of a parameter bank.
    """

    steps: int
    slots: dict
    labels: list[str] = field(default_factory=list)  # one per step: "prelude", "pass 0", ...
    names: dict = field(default_factory=dict)  # key -> how the plan shows it

    def describe(self) -> str:
        """One line per module: its uses and the step each fills."""
        labels = ", ".join(self.labels) if self.labels else ""
        lines = [f"StepPlan: {self.steps} steps [{labels}]"]
        width = max((len(n) for n in self.names.values()), default=0)
        for module, slots in self.slots.items():
            name = self.names.get(module, type(module).__name__)
            uses = f"{len(slots)} use{'s' if len(slots) != 1 else ' '}"
            lines.append(f"  {name:<{width}}  {uses} -> steps {slots}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def plan_steps(
    log: CallLog,
    names: Mapping[Hashable, str],
    *,
    expected_steps: int | None,
    allow_mixed_steps: bool,
) -> StepPlan:
    """Assign steps from one forward pass's call log.

    Args:
        log: the uses and calls the hook manager and the capture recorded.
        names: every key of ``log.entries`` (a module, or ``(bank, i)`` for a slice of a bank)
            -> how the plan shows it.
    """
    counts = {key: len(log.entries[key]) for key in names}
    distinct = sorted(set(counts.values()))
    loop_steps = distinct[-1]
    if expected_steps is not None and loop_steps != int(expected_steps):
        raise RuntimeError(
            f"observed {loop_steps} loop steps but expected_steps={expected_steps}; pass "
            "expected_steps=None to accept any horizon."
        )
    modules = list(names)
    if len(distinct) == 1:
        labels = [f"pass {t}" for t in range(loop_steps)]
        return StepPlan(
            loop_steps, {m: list(range(loop_steps)) for m in modules}, labels, dict(names)
        )

    shown_counts = sorted((names[k], c) for k, c in counts.items())
    by_count = sorted(shown_counts, key=lambda kv: (kv[1], kv[0]))
    shown = f"use counts {distinct}; fewest: {by_count[:5]}, most: {by_count[-5:]}"
    passes = _pass_bounds(log, modules, loop_steps, shown)
    where: dict[nn.Module, list[int | str]] = {}
    for module in modules:
        spans = [tuple(e[:2]) for e in log.entries[module]]
        if len(spans) == loop_steps and all(
            lo <= s[0] and s[1] <= hi for s, (lo, hi) in zip(spans, passes, strict=True)
        ):
            where[module] = list(range(loop_steps))
            continue
        where[module] = [_place(span, passes, names[module], shown) for span in spans]
    outside = sorted({w for ws in where.values() for w in ws if isinstance(w, str)})
    if outside and not allow_mixed_steps:
        raise RuntimeError(
            "selected parameters are used different numbers of times in one forward pass, and "
            f"some uses lie {' and '.join(outside)} the loop passes ({shown}). SDI needs one step "
            "per pass: select only the looped core, or pass allow_mixed_steps=True to put uses "
            "before/after the loop into a prelude/readout step."
        )
    offset = 1 if "before" in outside else 0
    steps = offset + loop_steps + (1 if "after" in outside else 0)
    labels = (["prelude"] if offset else []) + [f"pass {t}" for t in range(loop_steps)]
    labels += ["readout"] if steps > len(labels) else []

    def step(w: int | str) -> int:
        if w == "before":
            return 0
        return offset + loop_steps if w == "after" else offset + int(w)

    slots = {m: [step(w) for w in ws] for m, ws in where.items()}
    return StepPlan(steps, slots, labels, dict(names))


def _pass_bounds(
    log: CallLog, owners: list[nn.Module], loop_steps: int, shown: str
) -> list[tuple[int, int]]:
    """``(first, last)`` tick of each pass, from the modules called ``loop_steps`` times: the
    owners of selected parameters used that often, and the modules enclosing them (the loop
    layers) whose every call holds a use of such an owner."""
    full = [
        [tuple(e[:2]) for e in log.entries[k]] for k in owners if len(log.entries[k]) == loop_steps
    ]
    inner = [s for spans in full for s in spans]
    owned = set(owners)
    for module, spans in log.spans.items():
        if module in owned or len(spans) != loop_steps:
            continue
        if all(any(lo < a and b < hi for a, b in inner) for lo, hi in spans):
            full.append(spans)
    passes = [(min(s[p][0] for s in full), max(s[p][1] for s in full)) for p in range(loop_steps)]
    for p in range(loop_steps - 1):
        if passes[p][1] >= passes[p + 1][0]:
            raise RuntimeError(
                f"the modules used in every pass ({loop_steps} times) do not run pass after pass: "
                f"their call {p + 1} starts before their call {p} has ended everywhere, so the "
                f"loop passes are ambiguous ({shown}). Select modules of one loop."
            )
    return passes


def _place(span: tuple[int, int], passes: list[tuple[int, int]], name: str, shown: str):
    """The pass a use belongs to, or ``"before"`` / ``"after"`` the loop."""
    enter, leave = span
    if leave < passes[0][0]:
        return "before"
    if enter > passes[-1][1]:
        return "after"
    for p, (lo, hi) in enumerate(passes):
        after_pass = passes[p + 1][0] if p + 1 < len(passes) else hi + 1
        if lo <= enter and leave <= hi:
            return p  # inside the pass
        if hi < enter and leave < after_pass:
            return p  # between pass p and p + 1: it reads pass p's output
    raise RuntimeError(
        f"a use of {name!r} (ticks {enter}..{leave}) spans a boundary between loop passes "
        f"(ticks {passes}), so its step is ambiguous ({shown}). Select the enclosing loop layers "
        "as target_modules, or modules that run within one pass."
    )
