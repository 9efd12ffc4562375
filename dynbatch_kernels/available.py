"""What this installation can run: the C++ extension, triton, and Triton's interpreter. Imports no other
module of the package but :mod:`~dynbatch_kernels.extras`, so that every backend may use it."""

from __future__ import annotations

import importlib
import os
import warnings
from functools import cache

from dynbatch_kernels.extras import missing


@cache
def cpp_available() -> bool:
    """Load ``dynbatch_kernels._C`` once; warn once if it is missing."""
    try:
        importlib.import_module("dynbatch_kernels._C")
    except ImportError as err:
        warnings.warn(
            f"dynbatch_kernels._C is not built ({err}); CPU ops fall back to the slower PyTorch "
            "reference. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


@cache
def triton_available() -> bool:
    return not missing("triton")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
