"""Which parameters a featuriser attributes, who owns them, and which rule serves each module.

``target_modules`` holds modules (all their trainable parameters are selected) and parameters
themselves (selected too). A parameter that no selected module owns but that a selected module's
call uses (a bank's slice passed in, a tied weight, a parent's parameter) is *found* during the
first forward pass (:mod:`sdi.uses`) and added; its uses count inside selected calls only. Each selected parameter's *owner* is the first module in model order that registers
it. A module is served by a module-level rule (:func:`_module_rule`) or its parameters are
captured at the operation (:mod:`sdi.capture`); hash tables are drawn in this order, owner by
owner in model order, from one seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn as nn

from .rules import GENERIC, RULES, ModuleRule, check_supported, rule_for
from .rules.ops import SCALE_GRAD_BY_FREQ

NOTHING_SELECTED = (
    "target_modules hold no trainable parameters (all have requires_grad=False, or the modules "
    "own none), and no operation inside their calls computed with one: select the modules whose "
    "parameters you want analysed, with requires_grad=True"
)


@dataclass
class Selection:
    params: list[nn.Parameter]  # selected, in target_modules order
    names: dict  # every parameter of the model -> its name
    owner: dict  # every parameter -> (module name, module) registering it first
    module_params: dict  # module served by a module-level rule -> its selected direct params
    module_rules: dict  # module -> its rule (module-level rules only)
    draw_order: list  # selected params in table-drawing order
    draw_owners: list  # parallel: the module whose rule draws the table, None: by shape
    targets: list  # the selected modules
    found: list  # parameters found in use inside selected modules' calls (not selected)


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


def enclosing(model: nn.Module, owners) -> list[nn.Module]:
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


class _Operations(ModuleRule):
    """What :func:`check_supported` sees for parameters captured at the operation: refuses at
    once what their operations' rules would refuse at the first batch."""

    def check(self, module: nn.Module, param: nn.Parameter, *, exact: bool) -> str | None:
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            return SCALE_GRAD_BY_FREQ
        return None


_OP = _Operations()


def _module_rule(module: nn.Module, direct, owners) -> ModuleRule | None:
    """The module-level rule serving ``module``'s ``direct`` selected parameters, or ``None``:
    captured at the operation. Module-level: registered rules (``register_rule``, also the
    generic rule registered for a type) and Opacus' samplers (not for Linear and Embedding,
    whose operations' rules serve them), where the module owns its parameters alone."""
    if not direct or any(len(owners[p]) > 1 for p in direct):
        return None  # a parameter shared by several modules (tied): one path for all its uses
    rule = rule_for(module)
    if rule is GENERIC and RULES.get(type(module)) is not GENERIC:
        return None
    return rule


def select(
    model: nn.Module, target_modules, *, strict: bool, exact: bool, found: Sequence = ()
) -> Selection:
    """The :class:`Selection` of ``target_modules`` (modules, or parameters) in ``model``, plus the
    parameters ``found`` used inside selected modules' calls (captured at the operation, always;
    listed after the others, their tables drawn in model order as if selected)."""
    if isinstance(target_modules, nn.Module):
        target_modules = [target_modules]
    target_modules = list(target_modules)
    selected = _selected_params(list(target_modules))
    found = [p for p in found if p not in set(selected)]
    # Modules of the model that own none: the uses inside their calls may count (found later).
    inside = {id(m) for m in model.modules()}
    calls = [m for m in target_modules if isinstance(m, nn.Module) and id(m) in inside]
    if not selected and not (found or calls):
        raise ValueError(NOTHING_SELECTED)
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
    selected_set, found_set = set(selected) | set(found), set(found)
    owners: dict[nn.Parameter, list[tuple[str, nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if not any(m is module for _, m in owners.get(p, [])):
                owners.setdefault(p, []).append((module_name, module))
    owner = {p: found[0] for p, found in owners.items()}
    module_params: dict[nn.Module, list[nn.Parameter]] = {}  # module-level rules
    module_rules, draw_order, draw_owners = {}, [], []
    for module_name, module in model.named_modules():
        direct = [p for p in module.parameters(recurse=False) if p in selected_set]
        direct = [p for p in direct if owner[p][1] is module]
        rule = _module_rule(module, [p for p in direct if p not in found_set], owners)
        for p in direct:
            own = rule if p not in found_set else None
            module_rules[module] = check_supported(
                module,
                module_name,
                p,
                names[p],
                strict=strict,
                exact=exact,
                rule=own or _OP,
            )
            draw_order.append(p)
            draw_owners.append(module if own is not None else None)
        ruled = [p for p in direct if p not in found_set]
        if ruled and rule is not None:
            module_params[module], module_rules[module] = ruled, rule
        elif direct:
            module_rules.pop(module, None)

    return Selection(
        selected + found,
        names,
        owner,
        module_params,
        module_rules,
        draw_order,
        draw_owners,
        [m for m in target_modules if not isinstance(m, nn.Parameter)],
        found,
    )
