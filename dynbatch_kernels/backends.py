"""Which implementation runs an op: Triton, the C++ extension, or the plain-PyTorch reference.

``DYNBATCH_BACKEND=auto|triton|cpp|reference`` forces one. ``auto`` picks Triton for CUDA tensors and
the C++ extension for CPU tensors, falling back to the reference (with a one-time warning) when triton
(the ``triton`` extra) is not installed or the extension was not built. Triton runs CPU tensors only under
``TRITON_INTERPRET=1``, which must be set before ``dynbatch_kernels`` is imported.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache
from types import ModuleType

import torch

from dynbatch_kernels.available import cpp_available, triton_available, triton_interpreted
from dynbatch_kernels.extras import install_hint

__all__ = ["BACKENDS", "backend_module", "backend_name", "cpp_available", "requested_backend"]
__all__ += ["triton_available", "triton_interpreted"]

BACKENDS = ("auto", "triton", "cpp", "reference")


@cache
def _warn_no_triton() -> None:
    warnings.warn(
        "triton is not installed; CUDA ops fall back to the slower PyTorch reference. Install it with "
        f"`{install_hint('triton')}`.",
        RuntimeWarning,
        stacklevel=4,
    )


def requested_backend() -> str:
    name = os.environ.get("DYNBATCH_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"DYNBATCH_BACKEND: expected one of {BACKENDS}, got {name!r}")
    return name


def backend_name(device: torch.device) -> str:
    """The backend that runs ops on ``device`` now; raises if the forced one cannot."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_no_triton()
            return "reference"
        return "cpp" if device.type == "cpu" and cpp_available() else "reference"
    if name == "cpp" and (device.type != "cpu" or not cpp_available()):
        raise RuntimeError(f"DYNBATCH_BACKEND=cpp needs CPU tensors and the built extension, got {device}")
    if name == "triton":
        if not triton_available():
            hint = install_hint("triton")
            raise RuntimeError(f"DYNBATCH_BACKEND=triton but triton is not installed: `{hint}`")
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError("DYNBATCH_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
    return name


def backend_module(device: torch.device) -> ModuleType:
    """The module holding the implementations for ``device``; each module has the same functions."""
    name = backend_name(device)
    module = {"triton": "dynbatch_kernels.triton", "cpp": "dynbatch_kernels.cpp"}.get(
        name, "dynbatch_kernels.reference"
    )
    return importlib.import_module(module)
