"""SDI_BACKEND resolution: every value, every error text, and backend-independent sketches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sdi import backend
from sdi.backend import backend_info, get_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_default_is_auto_and_falls_back_to_torch_without_cuda(monkeypatch, no_cuda):
    monkeypatch.delenv("SDI_BACKEND", raising=False)
    info = backend_info()
    assert (info.requested, info.name) == ("auto", "torch")
    assert "CUDA" in info.reason or "Triton is not installed" in info.reason
    assert get_backend() is backend.TORCH


def test_torch_is_always_available(monkeypatch, no_cuda):
    monkeypatch.setenv("SDI_BACKEND", " Torch ")
    assert get_backend().name == "torch"


def test_unknown_value_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("SDI_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        get_backend()


def test_explicit_triton_without_cuda_says_why(monkeypatch, no_cuda):
    monkeypatch.setenv("SDI_BACKEND", "triton")
    with pytest.raises(
        RuntimeError, match="SDI_BACKEND=triton cannot be honoured: .*(CUDA|not installed)"
    ):
        get_backend()


def test_explicit_triton_without_triton_says_why(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # import triton -> ImportError
    monkeypatch.setenv("SDI_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        get_backend()
    monkeypatch.setenv("SDI_BACKEND", "auto")
    assert get_backend().name == "torch"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_enables_explicit_triton_but_not_auto(monkeypatch, no_cuda):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SDI_BACKEND", "triton")
    info = backend_info()
    assert info.name == "triton" and "interpreter" in info.reason
    monkeypatch.setenv("SDI_BACKEND", "auto")
    assert backend_info().name == "torch"


def test_argument_overrides_environment(monkeypatch, no_cuda):
    monkeypatch.setenv("SDI_BACKEND", "triton")
    assert backend_info("torch").name == "torch"
