"""Feature sizes checked before the work: a refusal naming the bytes and the knob to turn, instead
of an allocator's "can't allocate 309 GB" deep inside a pass.

One batch's features are one fp32 tensor ``(B, steps, D)`` (``(B, D)`` summed over steps), ``D``
the columns of every selected parameter: ``projection_size`` each for the projected estimator,
``numel`` each for the exact one. What cannot fit in the device's whole memory is refused:
at construction for a single example and step, then per batch once its size and steps are known
(after its forward, before its backward).
"""

from __future__ import annotations

import os

import torch

FLOAT_BYTES = 4  # features are fp32


class FeaturesTooLargeError(ValueError):
    """The features would not fit in the device's memory: the message names the knob to turn."""


def device_memory_bytes(device: torch.device) -> int | None:
    """The whole memory of ``device`` (a GPU's, or the machine's RAM for the CPU); ``None`` when
    unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_features_fit(
    *,
    width: int,
    params: int,
    projection_size: int | None,
    device: torch.device,
    batch: int = 1,
    steps: int = 1,
) -> None:
    """Refuse features ``(batch, steps, width)`` fp32 larger than ``device``'s memory.

    ``params``: the number of selected parameters; ``projection_size``: the sketch size, ``None``
    for exact features (``width`` is then the parameters' total ``numel``).
    """
    needed = batch * steps * width * FLOAT_BYTES
    memory = device_memory_bytes(device)
    if memory is None or needed <= memory:
        return
    if projection_size is not None:
        how = (
            f"{batch} examples x {steps} steps x {params} parameters x projection_size "
            f"{projection_size} x {FLOAT_BYTES} bytes"
        )
        knob = (
            "lower projection_size (columns per parameter; its error shrinks like "
            "1/sqrt(projection_size), 2048 is the default), select fewer parameters "
            "(target_modules)"
        )
    else:
        how = f"{batch} examples x {steps} steps x {width} parameter entries (numel) x 4 bytes"
        knob = (
            "use ProjectedTracInSDI (projection_size columns per parameter instead of its numel), "
            "select fewer parameters (target_modules)"
        )
    per_batch = ", or use smaller batches in the loaders" if batch > 1 else ""
    raise FeaturesTooLargeError(
        f"the features of {'one batch' if batch > 1 else 'one example at one step'} would take "
        f"{_gib(needed)} ({how}), more than the {_gib(memory)} of memory of {device}: "
        f"{knob}{per_batch}."
    )
