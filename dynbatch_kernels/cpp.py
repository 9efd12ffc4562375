"""The C++ backend: the CPU kernels of ``dynbatch_kernels._C``, with the same signatures as the others.

Every tensor operand is a list: ``[flat]`` (a buffer laid out by the chunk table) or one tensor per
segment, read and written where it lives. The kernels take the table as its host offsets and lengths,
chunk bounds and segment maps (all CPU int64 on a CPU table); they check every operand themselves.
"""

from __future__ import annotations

import torch

from dynbatch_kernels import _C
from dynbatch_kernels.chunks import ChunkTable


def _table(chunks: ChunkTable) -> tuple[torch.Tensor, ...]:
    """The table arguments of every ``dynbatch_cpp`` kernel, in schema order."""
    return (
        chunks.host_offsets,
        chunks.host_lengths,
        chunks.starts,
        chunks.ends,
        chunks.segment_chunks,
        chunks.chunk_segments,
    )


def accumulate_(
    acc: list[torch.Tensor], grad: list[torch.Tensor], chunks: ChunkTable, scale: float, zero_grad: bool
) -> torch.Tensor:
    """The kernel through ``_C.accumulate_``, its direct entry: the accumulator calls it once per
    micro-batch, and the dispatcher's boxed call from Python took most of that call's host time."""
    return _C.accumulate_(acc, grad, *_table(chunks), float(scale), bool(zero_grad))


def extrapolate_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    direction: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    zero_direction: bool,
) -> None:
    torch.ops.dynbatch_cpp.extrapolate_(params, saved, direction, hyper, *_table(chunks), zero_direction)


def extrap_step_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    grad: list[torch.Tensor],
    momentum: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    extrapolate_next: bool,
) -> None:
    torch.ops.dynbatch_cpp.extrap_step_(
        params, saved, grad, momentum, hyper, *_table(chunks), extrapolate_next
    )


def segment_sq_norms(x: list[torch.Tensor], chunks: ChunkTable, scale: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.dynbatch_cpp.segment_sq_norms(x, *_table(chunks), scale)


def _pass1(op, *args) -> torch.Tensor:
    """``op`` (``lamb_step_`` or ``lamb_update_``: the same arguments) with ``chunks`` (the ninth) as its
    table arguments."""
    return op(*args[:8], *_table(args[8]), *args[9:])


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
    return _pass1(torch.ops.dynbatch_cpp.lamb_update_, *args, grad_sq_norm, inv_grad_scale, found_inf)


def lamb_step_(*args) -> torch.Tensor:
    """Both passes in one C++ call; the arguments of :func:`lamb_update_`."""
    return _pass1(torch.ops.dynbatch_cpp.lamb_step_, *args)


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
    torch.ops.dynbatch_cpp.lamb_apply_(
        param, update, master, step, hyper, stats, *_table(chunks), grad_sq_norm, found_inf
    )
