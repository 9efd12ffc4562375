"""The optional dependencies (the extras of pyproject.toml): which modules each provides, and the hint
naming the extra to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

#: The modules each extra provides, as imported.
EXTRA_MODULES = {"triton": ("triton",), "demo": ("tqdm", "matplotlib", "sklearn")}


def install_hint(extra: str) -> str:
    return f"pip install 'dynbatch_kernels[{extra}]'"


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported."""
    absent = []
    for module in EXTRA_MODULES[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(module)
    return absent


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module`` (from ``extra``); if that fails, raise an ImportError that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is missing ({err}): install it with `{install_hint(extra)}`") from err
