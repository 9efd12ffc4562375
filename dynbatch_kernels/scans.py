"""Scans over every parameter that the optimizers and layouts make once or twice per step.

Each reads one or two attributes of every tensor of a list. In Python that is a call per tensor and
attribute, and after a step's kernels have streamed the buffers through the caches most of those calls miss
them: on 2,000 parameters the scans of one step cost milliseconds. With the extension built they run in
C++ (``dynbatch_kernels._C``, one pass per scan); these Python versions are used otherwise, and the tests
check that both give the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from dynbatch_kernels.available import cpp_available

Tensors = Sequence[torch.Tensor]


def tensor_marks(tensors: Tensors) -> list[tuple[int, int]]:
    """``(t.data_ptr(), t._version)`` of every tensor: what changes when anyone writes it (except in place
    through ``.data``, which torch does not version)."""
    return _scan("tensor_marks")(tensors)


def grads_of(owners: Tensors) -> tuple[list[torch.Tensor | None], list[int], list[int]]:
    """``(grads, missing, frozen)``: every ``owner.grad``, the indices of those that are ``None``, and the
    indices of the owners with ``requires_grad=False``."""
    return _scan("grads_of")(owners)


def misfits(tensors: Sequence[torch.Tensor | None], starts: Sequence[int] | None) -> list[int]:
    """The indices ``j`` whose tensor is ``None`` or that a kernel cannot take as it is: with ``starts``
    None, a tensor that is not contiguous; else one that is not empty and does not start at address
    ``starts[j]`` (not the view of its segment of a flat buffer)."""
    return _scan("misfits")(tensors, starts)


@cache
def _scan(name: str):
    if cpp_available():
        from dynbatch_kernels import _C

        return getattr(_C, name)
    return globals()[f"_{name}"]


def _tensor_marks(tensors: Tensors) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t._version) for t in tensors]


def _grads_of(owners: Tensors) -> tuple[list[torch.Tensor | None], list[int], list[int]]:
    grads = [p.grad for p in owners]
    missing = [j for j, g in enumerate(grads) if g is None]
    frozen = [j for j, p in enumerate(owners) if not p.requires_grad]
    return grads, missing, frozen


def _misfits(tensors: Sequence[torch.Tensor | None], starts: Sequence[int] | None) -> list[int]:
    if starts is None:
        return [j for j, t in enumerate(tensors) if t is None or not t.is_contiguous()]
    if len(starts) != len(tensors):
        raise ValueError(f"starts: expected {len(tensors)} addresses (one per tensor), got {len(starts)}")
    pairs = enumerate(zip(tensors, starts))
    return [j for j, (t, a) in pairs if t is None or (t.data_ptr() != a and t.numel() != 0)]
