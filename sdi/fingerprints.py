"""Content fingerprints of what stored features depend on: loss function, model structure, checkpoint.

Each function returns a short hex digest that changes when the thing it describes changes in a way
that can change the features, and stays equal across processes and runs otherwise. They feed the
feature store's identity (:mod:`sdi.store`) and the cross-rank consistency check
(:mod:`sdi.distributed`).

Limits (documented for users in the README's "What the store checks"):

- :func:`loss_fn_fingerprint` hashes the function's bytecode, constants, defaults, closure values
  and the module-level *constants* (numbers, strings, tensors, ...) it reads by name, recursively
  through nested code objects and ``functools.partial``. It does not follow calls into other
  functions or read mutable objects it reaches through attributes: a loss that calls a helper whose
  code changed keeps its fingerprint. Closure values are hashed by content, so a loss closing over
  a list it appends to (a call counter, a log) changes its fingerprint as the list grows. A
  callable object is hashed by its class's ``__call__`` and its plain attributes.
- :func:`model_fingerprint` hashes every submodule's type, its plain attributes (numbers, strings,
  booleans, and tuples or lists of them -- e.g. a loop count), and the names, shapes and dtypes of
  its parameters and buffers; not their values (checkpoints carry those).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _digest() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=16)


def _update_value(h: hashlib._Hash, value: Any, depth: int = 0) -> bool:
    """Hash ``value`` if it is plain data (numbers, strings, tensors, containers of them)."""
    if depth > 8:
        return False
    if isinstance(value, _PLAIN):
        h.update(f"{type(value).__name__}:{value!r};".encode())
        return True
    if torch.is_tensor(value):
        t = value.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return True
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        h.update(f"{type(value).__name__}[".encode())
        for item in items:
            if not _update_value(h, item, depth + 1):
                h.update(f"<{type(item).__qualname__}>".encode())
        h.update(b"]")
        return True
    if isinstance(value, dict):
        h.update(b"dict{")
        for key in sorted(value, key=repr):
            _update_value(h, key, depth + 1)
            if not _update_value(h, value[key], depth + 1):
                h.update(f"<{type(value[key]).__qualname__}>".encode())
        h.update(b"}")
        return True
    return False


def _update_code(h: hashlib._Hash, code: types.CodeType, globals_: dict, seen: set) -> None:
    if id(code) in seen:
        return
    seen.add(id(code))
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _update_code(h, const, globals_, seen)
        else:
            _update_value(h, const)
    for name in code.co_names:  # module-level constants the code reads by name
        if name in globals_:
            value = globals_[name]
            if not callable(value) and not isinstance(value, types.ModuleType):
                h.update(f"global {name}=".encode())
                _update_value(h, value)


def _update_callable(h: hashlib._Hash, fn: Any, seen: set, depth: int = 0) -> None:
    if depth > 4:
        return
    if isinstance(fn, functools.partial):
        h.update(b"partial(")
        _update_callable(h, fn.func, seen, depth + 1)
        _update_value(h, list(fn.args))
        _update_value(h, dict(fn.keywords))
        h.update(b")")
        return
    if inspect.ismethod(fn):
        _update_callable(h, fn.__func__, seen, depth + 1)
        return
    function = fn if inspect.isfunction(fn) else type(fn).__call__
    h.update(
        f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode()
    )
    if not inspect.isfunction(fn):  # a callable object: its state counts too
        _update_value(
            h,
            {k: v for k, v in vars(fn).items() if isinstance(v, _PLAIN)}
            if hasattr(fn, "__dict__")
            else None,
        )
    if not inspect.isfunction(function):
        return
    _update_code(h, function.__code__, function.__globals__, seen)
    _update_value(h, function.__defaults__)
    _update_value(h, function.__kwdefaults__)
    for cell in function.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if not _update_value(h, content) and callable(content):
            _update_callable(h, content, seen, depth + 1)


def loss_fn_fingerprint(fn: Callable) -> str:
    """A digest of ``fn``'s code and constants (see the module docstring for what it covers)."""
    h = _digest()
    _update_callable(h, fn, set())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s structure: module types, plain attributes, parameter/buffer shapes."""
    h = _digest()
    for name, module in model.named_modules():
        h.update(f"module {name}: {type(module).__module__}.{type(module).__qualname__};".encode())
        for key in sorted(vars(module)):
            if key.startswith("_") or key == "training":
                continue
            value = vars(module)[key]
            if isinstance(value, _PLAIN) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
            ):
                h.update(f"{key}=".encode())
                _update_value(h, value)
        for kind, tensors in (
            ("param", module.named_parameters(recurse=False)),
            ("buffer", module.named_buffers(recurse=False)),
        ):
            for tname, t in tensors:
                h.update(f"{kind} {tname}:{t.dtype}:{tuple(t.shape)};".encode())
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint file, of every file of a checkpoint folder, else of its name.

    A folder's digest covers each file's path relative to the folder and its content, so a
    Trainer checkpoint folder whose weights (or ``trainer_state.json``) changed gets a new digest.
    A path that is neither (a custom ``load_checkpoint_fn``'s key) is identified by its string.
    """
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                h.update(f"{full.relative_to(path).as_posix()}:{file_sha256(full)};".encode())
        return h.hexdigest()
    return hashlib.sha256(str(path).encode()).hexdigest()
