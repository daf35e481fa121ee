"""Which step slot each use of each selected module fills.

Steps are inferred from how often the selected parameters are used in one forward pass. When every
parameter is used ``tau`` times, use ``t`` fills slot ``t``. With ``allow_mixed_steps=True``,
parameters used once before the loop go to a *prelude* slot in front of the loop steps and those
used once after it to a *readout* slot behind them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn as nn

from .hooks import CallLog


@dataclass(frozen=True)
class StepPlan:
    steps: int
    slots: dict[nn.Module, list[int]]  # module -> slot of each of its uses, in forward order


def plan_steps(
    log: CallLog,
    owners: Mapping[str, nn.Module],
    *,
    expected_steps: int | None,
    allow_mixed_steps: bool,
) -> StepPlan:
    """Assign slots from one forward pass's call log.

    Args:
        log: the calls the hook manager recorded.
        owners: selected parameter name -> the module that owns it.
    """
    counts = {name: len(log.uses.get(module, ())) for name, module in owners.items()}
    unused = sorted(name for name, c in counts.items() if c == 0)
    if unused:
        raise RuntimeError(
            f"selected parameters never used in the forward pass: {unused[:20]}. Pass only modules "
            "the model runs, and do not run the loss under torch.no_grad()."
        )
    distinct = sorted(set(counts.values()))
    loop_steps = distinct[-1]
    if expected_steps is not None and loop_steps != int(expected_steps):
        raise RuntimeError(
            f"observed {loop_steps} loop steps but expected_steps={expected_steps}; pass "
            "expected_steps=None to accept any horizon."
        )
    modules = {id(m): m for m in owners.values()}.values()
    if len(distinct) == 1:
        return StepPlan(loop_steps, {m: list(range(loop_steps)) for m in modules})

    by_count = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if not allow_mixed_steps:
        raise RuntimeError(
            "selected parameters are used different numbers of times in one forward pass "
            f"(counts {distinct}; fewest: {by_count[:5]}, most: {by_count[-5:]}). SDI needs one "
            "step count: select only the looped core, or pass allow_mixed_steps=True to put "
            "single-use parameters into a prelude/readout slot."
        )
    odd = sorted(name for name, c in counts.items() if c not in (1, loop_steps))
    if odd:
        raise RuntimeError(
            f"allow_mixed_steps=True accepts use counts 1 and {loop_steps} only; these differ: "
            f"{[(n, counts[n]) for n in odd[:10]]}"
        )

    looped = [m for m in modules if len(log.uses[m]) == loop_steps]
    first = min(log.uses[m][0] for m in looped)
    last = max(log.uses[m][-1] for m in looped)
    place: dict[nn.Module, str] = {}
    for name, module in owners.items():
        if counts[name] != 1:
            continue
        position = log.uses[module][0]
        if first < position < last:
            raise RuntimeError(
                f"parameter {name!r} is used once, inside the loop (call {position} of the loop's "
                f"{first}..{last}): it can go neither to the prelude nor to the readout slot."
            )
        place[module] = "prelude" if position < first else "readout"
    offset = 1 if "prelude" in place.values() else 0
    steps = offset + loop_steps + (1 if "readout" in place.values() else 0)
    slots = {m: [offset + t for t in range(loop_steps)] for m in looped}
    for module, where in place.items():
        slots[module] = [0] if where == "prelude" else [offset + loop_steps]
    return StepPlan(steps, slots)
