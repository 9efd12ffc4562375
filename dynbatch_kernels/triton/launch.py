"""What every launcher shares: the device guard, and the alignment hint on the chunk bounds.

A masked load or store becomes one 16-byte access per thread only when the compiler can prove its
addresses 16-byte aligned and its mask constant over the vector. The pointers are: Triton specialises
every pointer argument on ``data_ptr() % 16``. The chunk bounds the kernels load are not, unless marked:
in an aligned :class:`~dynbatch_kernels.chunks.ChunkTable` every bound is a multiple of
:data:`~dynbatch_kernels.chunks.ALIGN` elements, so the launchers pass ``ALIGNED=chunks.aligned`` and the
kernels load their bounds with :func:`load_bound`. An unaligned table gets the scalar variant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from dynbatch_kernels.chunks import ALIGN

_ALIGN: tl.constexpr = tl.constexpr(ALIGN)
F = TypeVar("F", bound=Callable)


@triton.jit
def load_bound(pointer, ALIGNED: tl.constexpr):
    """Load a chunk bound, marked as a multiple of ``ALIGN`` elements when ``ALIGNED``.

    The mark must sit on the load itself (a hint on a value passed into a function is lost when the
    function is inlined); ``tl.where`` of two marked bounds keeps the mark.
    """
    bound = tl.load(pointer)
    if ALIGNED:
        bound = tl.multiple_of(bound, _ALIGN)
    return bound


def on_device_of_first(launcher: F) -> F:
    """Run ``launcher`` with its first argument's CUDA device current (a no-op for CPU tensors).

    Triton launches on the current device and its stream, so a buffer on ``cuda:1`` needs ``cuda:1``
    current even when the caller's is ``cuda:0``.
    """

    @functools.wraps(launcher)
    def guarded(tensor: torch.Tensor, *args, **kwargs):
        with torch.cuda.device_of(tensor):
            return launcher(tensor, *args, **kwargs)

    return guarded  # type: ignore[return-value]
