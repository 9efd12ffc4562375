"""Registration of the fused ops as ``torch.ops.dynbatch`` custom ops, with an eager fast path."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from dynbatch_kernels.checks import eager


def fused_op(name: str, mutates_args: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Register the decorated function as the custom op ``dynbatch::<name>`` and return a caller of it.

    In plain eager mode (:func:`~dynbatch_kernels.checks.eager`: plain tensors, no dispatch or
    torch-function mode, not compiling) the caller runs the function directly, skipping the op's Python
    dispatch (about 60 us per call on the CPU). Otherwise (``torch.compile``, ``FakeTensorMode``,
    ``make_fx``, tensor subclasses) it goes through the registered op, and so through the fake
    implementation registered with ``.register_fake`` where there is no real memory. Both run the same
    backend code.
    """

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"dynbatch::{name}", fn, mutates_args=mutates_args)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if eager(*args) else op(*args)

        call.register_fake = op.register_fake
        return call

    return register
