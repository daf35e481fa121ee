"""Sketch kernels: ``torch_ops`` (plain torch, any device) and the Triton kernels.

The Triton modules import ``triton`` at import time, so they are loaded lazily by
:mod:`sdi.backend`, never from here.
"""
