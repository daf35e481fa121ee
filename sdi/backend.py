"""Which kernels compute the sketches: ``SDI_BACKEND=auto|torch|triton`` (default ``auto``).

- ``torch``: the plain-torch ops in :mod:`sdi.kernels.torch_ops`, on any device.
- ``triton``: the Triton kernels in :mod:`sdi.kernels`; needs Triton and either a CUDA device or
  ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, slow, for tests). If it cannot run, asking for
  it is an error that says why -- never a silent fallback.
- ``auto``: Triton for tensors on a CUDA device when Triton is usable, torch otherwise. Never fails.

Every backend computes the same sketch from the same hash tables (see :mod:`sdi.sketch`), so the
choice changes speed only. ``backend_info()`` reports the choice and the reason for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from .kernels import torch_ops

VALID_BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "SDI_BACKEND"


@dataclass(frozen=True)
class SketchBackend:
    """The three sketch operations, all returning fp32 (shapes in :mod:`sdi.kernels.torch_ops`),
    and what the backend can do beyond them.

    ``runs_cpu_fast_paths``: for CPU tensors the callers may replace the backend's ops by the
    plain-torch CPU fast paths (the materialised Linear gradient) when the cost model says they
    are cheaper. False for ``triton``: an explicit request keeps its kernels, also in the CPU
    interpreter.
    """

    name: str
    count_sketch: Callable
    tensor_sketch_linear: Callable
    tensor_sketch_embedding: Callable
    runs_cpu_fast_paths: bool = True


@dataclass(frozen=True)
class BackendInfo:
    requested: str  # the value of SDI_BACKEND (or the argument), lower-cased
    name: str  # "torch", "triton", or "auto" (Triton on CUDA tensors, torch elsewhere)
    reason: str


TORCH = SketchBackend(
    "torch",
    torch_ops.count_sketch,
    torch_ops.tensor_sketch_linear,
    torch_ops.tensor_sketch_embedding,
)


def triton_usable() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why (or why not)."""
    try:
        import triton
    except ImportError as err:
        return (
            False,
            f"Triton is not installed ({err}); install it with `pip install 'sdi[triton]'`",
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"Triton {triton.__version__} in the CPU interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device is available (torch.cuda.is_available() is False); "
            "set TRITON_INTERPRET=1 to run the Triton kernels in the CPU interpreter"
        )
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


@lru_cache(maxsize=1)
def _triton_backend() -> SketchBackend:
    from .kernels import count_sketch, embedding, linear

    return SketchBackend(
        "triton",
        count_sketch.count_sketch,
        linear.tensor_sketch_linear,
        # No id-range check (a device sync per call, in a backward hook): the estimator's ids
        # already passed nn.Embedding's forward, and the kernel ignores out-of-range ids anyway.
        partial(embedding.tensor_sketch_embedding, check_ids=False),
        runs_cpu_fast_paths=False,
    )


def _per_device(op: str) -> Callable:
    """Route one op by the device of its first tensor: Triton on CUDA, torch elsewhere."""
    torch_fn = getattr(TORCH, op)

    def run(x: torch.Tensor, *args):
        fn = getattr(_triton_backend(), op) if x.is_cuda else torch_fn
        return fn(x, *args)

    return run


def _requested(name: str | None) -> str:
    value = (
        name if name is not None else os.environ.get(ENV_VAR, "auto")
    ).strip().lower() or "auto"
    if value not in VALID_BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a backend; valid values: {', '.join(VALID_BACKENDS)}"
        )
    return value


def backend_info(name: str | None = None) -> BackendInfo:
    """Resolve ``name`` (default: ``$SDI_BACKEND``, else ``auto``) and say why; raises if impossible."""
    requested = _requested(name)
    if requested == "torch":
        return BackendInfo(requested, "torch", f"{ENV_VAR}=torch asks for the plain-torch kernels")
    ok, why = triton_usable()
    if requested == "triton":
        if not ok:
            raise RuntimeError(f"{ENV_VAR}=triton cannot be honoured: {why}")
        return BackendInfo(requested, "triton", why)
    if not ok:
        return BackendInfo(requested, "torch", f"auto chose torch: {why}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter is a test tool, far slower than torch: auto never picks it for CPU tensors.
        return BackendInfo(
            requested,
            "torch",
            "auto chose torch: no CUDA device (the Triton interpreter is for tests)",
        )
    return BackendInfo(
        requested, "auto", f"auto: Triton for CUDA tensors ({why}), torch for CPU tensors"
    )


def get_backend(name: str | None = None) -> SketchBackend:
    """The sketch backend for ``name`` (default: ``$SDI_BACKEND``); see :func:`backend_info`."""
    info = backend_info(name)
    if info.name == "torch":
        return TORCH
    if info.name == "triton":
        return _triton_backend()
    return SketchBackend(
        "auto",
        _per_device("count_sketch"),
        _per_device("tensor_sketch_linear"),
        _per_device("tensor_sketch_embedding"),
    )
