"""Why a forward pass gave the selected parameters no step, and what to say about a scalar loss.

Called from the few places where :mod:`sdi.featurize` refuses or warns, so that the message names
the cause and the fix instead of a generic one:

- a scalar loss with ``loss_reduction="sum"`` (:data:`SCALAR_SUM_LOSS`);
- selected parameters never used in the forward pass (:func:`unused_error`): their modules ran
  with gradients off (``torch.utils.checkpoint(use_reentrant=True)``, ``torch.no_grad()``), or a
  parameter of the root module was selected (``target_modules=model``), or they did not run --
  some of them (:func:`never_ran_error`), or all, a batch whose data-dependent loop halted before
  its first step, whose features are zero (:func:`no_step_warning`);
- a parameter of the root module in a looped model (:func:`root_selection_error`): the root's one
  call spans every loop pass, so its use has no step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

SCALAR_SUM_LOSS = (
    "loss_fn returned a scalar, and loss_reduction='sum' (the default) takes it as the SUM of "
    "the batch's per-example losses. If it is a mean (F.cross_entropy's default reduction, a "
    "Hugging Face outputs.loss), every score is scaled by 1/(B_train * B_query) and a short last "
    "batch counts more in every ranking. Either return the per-example losses, shape (B,) -- e.g. "
    "F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none')"
    ".view(B, -1).mean(dim=1) -- or, if the scalar is the batch mean, pass loss_reduction='mean'."
)

_CHECKPOINT_FILE = "torch/utils/checkpoint.py"


def _in_reentrant_checkpoint() -> bool:
    """Whether the current call runs inside ``torch.utils.checkpoint``'s reentrant forward."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith(_CHECKPOINT_FILE):
            return True
        frame = frame.f_back
    return False


def _grad_modes(modules: Sequence[nn.Module], run: Callable[[], Any]) -> dict[nn.Module, set[str]]:
    """``run()`` once with hooks on ``modules``: for each module called, how it ran --
    ``"grad"``, ``"checkpoint"`` (gradients off inside a reentrant ``torch.utils.checkpoint``)
    or ``"no_grad"`` (gradients off otherwise)."""
    seen: dict[nn.Module, set[str]] = {}

    def record(module, args):
        if torch.is_grad_enabled():
            mode = "grad"
        else:
            mode = "checkpoint" if _in_reentrant_checkpoint() else "no_grad"
        seen.setdefault(module, set()).add(mode)

    handles = [m.register_forward_pre_hook(record) for m in dict.fromkeys(modules)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _children_selection(model: nn.Module) -> str:
    names = [
        name for name, child in model.named_children() if next(child.parameters(), None) is not None
    ]
    return f"[{', '.join(f'model.{n}' for n in names)}]" if names else "the submodules"


def root_selection_error(model: nn.Module, root_params: list[str], why: str) -> RuntimeError:
    """Parameters owned by the root module (``target_modules=model``) have no step: ``why``."""
    return RuntimeError(
        f"parameters {root_params} belong to the root module ({type(model).__name__}) itself, so "
        f"target_modules=model selected them; {why}. Select submodules instead: the looped core "
        f"alone (e.g. target_modules=model.core), or every child owning parameters, "
        f"target_modules={_children_selection(model)} with allow_mixed_steps=True. Parameters of "
        "the root itself cannot be selected in a looped model: to analyse them, move them into a "
        "submodule."
    )


def unused_error(
    model: nn.Module,
    unused: dict[str, nn.Module],
    run: Callable[[], Any],
) -> RuntimeError | None:
    """The error for selected parameters (``name -> owning module``) that no use reached, with
    its cause; ``None`` when their modules did not run at all (a loop that halted before its
    first step, or modules the model never calls). ``run()`` re-runs the batch's loss once to
    see how they ran (only on this error path)."""
    root = [name for name, module in unused.items() if module is model]
    if root:
        return root_selection_error(
            model, root, "the model's output is not a tensor sdi can pair a gradient with"
        )
    modes = _grad_modes(list(unused.values()), run)
    ran_without_grad = {
        name: modes[m] - {"grad"} for name, m in unused.items() if modes.get(m, set()) - {"grad"}
    }
    if any("checkpoint" in m for m in ran_without_grad.values()):
        names = [n for n, m in ran_without_grad.items() if "checkpoint" in m]
        return RuntimeError(
            f"selected parameters {names[:10]} run inside torch.utils.checkpoint(..., "
            "use_reentrant=True), whose forward runs with gradients off, so sdi sees no use of "
            "them to pair a gradient with. Pass use_reentrant=False to torch.utils.checkpoint "
            "(or gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': "
            "False}) in transformers): sdi supports it."
        )
    if ran_without_grad:
        names = list(ran_without_grad)
        return RuntimeError(
            f"selected parameters {names[:10]} ran with gradients off (torch.no_grad(), "
            "torch.inference_mode() or requires_grad_(False) on their input inside the model), so "
            "they have no gradient: run the loss with gradients on."
        )
    ran = [name for name, m in unused.items() if m in modes]
    if ran:
        return RuntimeError(
            f"the modules of selected parameters {ran[:10]} ran, but returned no floating-point "
            "tensor first (a dict, an integer tensor, None), so sdi has no output to pair a "
            "gradient with: select the submodules that compute their tensor outputs."
        )
    return None


def never_ran_error(unused: list[str], used: list[str]) -> RuntimeError:
    """Some selected parameters ran in this forward pass, others (``unused``) not at all."""
    return RuntimeError(
        f"selected parameters {unused[:10]} were never used in this batch's forward pass, while "
        f"{used[:3]}{' ...' if len(used) > 3 else ''} were. Select only modules the model runs "
        "for every batch: a module that runs only in later loop passes (a gate) is not used in a "
        "batch whose data-dependent loop halted before them; leave it out of target_modules."
    )


def no_step_warning(batch: int, steps: int) -> str:
    """A batch for which no selected module ran: its features are zero, stated once per call."""
    return (
        f"no selected module ran for a batch of {batch} examples (a data-dependent loop that "
        "halted before its first step, or target_modules the model never calls): their features "
        f"are zero, so their influence scores are 0 ({steps} zero steps; pass expected_steps= to "
        "fix that number). If the model never calls target_modules, select the modules it runs."
    )
