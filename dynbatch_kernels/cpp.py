"""The C++ backend: the CPU kernels of ``dynbatch_kernels._C``, with the same signatures as the others.

Every tensor operand is a list: ``[flat]`` (a buffer laid out by the chunk table) or one tensor per
segment, read and written where it lives. The kernels take the table as its host offsets and lengths,
chunk bounds and segment maps (all CPU int64 on a CPU table); they check every operand themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from dynbatch_kernels import _C
from dynbatch_kernels.chunks import ChunkTable


def _kernel(name: str) -> Callable[..., torch.Tensor | None]:
    """The CPU kernel of ``torch.ops.dynbatch_cpp.<name>``, taking the operator's arguments in order."""
    return partial(_C.call_cpu, f"dynbatch_cpp::{name}")


_accumulate = _kernel("accumulate_")
_extrapolate = _kernel("extrapolate_")
_extrap_step = _kernel("extrap_step_")
_segment_sq_norms = _kernel("segment_sq_norms")
_lamb_update = _kernel("lamb_update_")
_lamb_step = _kernel("lamb_step_")
_lamb_apply = _kernel("lamb_apply_")


def accumulate_(
    acc: list[torch.Tensor],
    grad: list[torch.Tensor],
    chunks: ChunkTable,
    scale: float,
    zero_grad: bool,
    out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    return _accumulate(acc, grad, out, *chunks.cpu_args, float(scale), bool(zero_grad))


def extrapolate_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    direction: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    zero_direction: bool,
) -> None:
    _extrapolate(params, saved, direction, hyper, *chunks.cpu_args, bool(zero_direction))


def extrap_step_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    grad: list[torch.Tensor],
    momentum: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    extrapolate_next: bool,
) -> None:
    _extrap_step(params, saved, grad, momentum, hyper, *chunks.cpu_args, bool(extrapolate_next))


def segment_sq_norms(x: list[torch.Tensor], chunks: ChunkTable, scale: torch.Tensor | None) -> torch.Tensor:
    return _segment_sq_norms(x, *chunks.cpu_args, scale)


def _pass1(op, *args) -> torch.Tensor:
    """``op`` (``lamb_step_`` or ``lamb_update_``: the same arguments) with ``chunks`` (the ninth) as its
    table arguments."""
    return op(*args[:8], *args[8].cpu_args, *args[9:])


def lamb_update_(
    param: list[torch.Tensor],
    grad: list[torch.Tensor],
    update: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    master: list[torch.Tensor] | None,
    step: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    grad_sq_norm: torch.Tensor | None,
    inv_grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> torch.Tensor:
    args = (param, grad, update, exp_avg, exp_avg_sq, master, step, hyper, chunks)
    return _pass1(_lamb_update, *args, grad_sq_norm, inv_grad_scale, found_inf)


def lamb_step_(*args) -> torch.Tensor:
    """Both passes in one C++ call; the arguments of :func:`lamb_update_`."""
    return _pass1(_lamb_step, *args)


def lamb_apply_(
    param: list[torch.Tensor],
    update: list[torch.Tensor],
    master: list[torch.Tensor] | None,
    step: torch.Tensor,
    hyper: torch.Tensor,
    stats: torch.Tensor,
    chunks: ChunkTable,
    grad_sq_norm: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    _lamb_apply(param, update, master, step, hyper, stats, *chunks.cpu_args, grad_sq_norm, found_inf)
