"""Triton extrapolate_ and extrap_step_: the two passes of extrapolated SGD (math in ``ops/extrap.py``).

One program per chunk; the chunk's segment selects its row of the per-segment hyper-parameter table (an
inactive segment's programs mask every load and store off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynbatch_kernels import columns
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.triton.launch import TAIL, chunk_extent, chunk_pointer, on_device_of_first, operand_args

#: Elements per loop step inside a chunk (a documented fixed choice, as for accumulate_: 1024 elements,
#: four warps, eight float32 values per thread per tensor). Purely elementwise: no tuning target.
BLOCK = 1024
NUM_WARPS = 4

_LR: tl.constexpr = tl.constexpr(columns.EXTRAP_LR)
_GAMMA: tl.constexpr = tl.constexpr(columns.EXTRAP_GAMMA)
_MOMENTUM: tl.constexpr = tl.constexpr(columns.EXTRAP_MOMENTUM)
_WEIGHT_DECAY: tl.constexpr = tl.constexpr(columns.EXTRAP_WEIGHT_DECAY)
_NESTEROV: tl.constexpr = tl.constexpr(columns.EXTRAP_NESTEROV)
_ACTIVE: tl.constexpr = tl.constexpr(columns.EXTRAP_ACTIVE)
_NUM_HYPER: tl.constexpr = tl.constexpr(columns.NUM_EXTRAP_HYPER)


@triton.jit
def _extrapolate_block(params, saved, direction, offs, count, gamma, lam, ZERO_DIRECTION: tl.constexpr):
    """``saved = w; params = w - gamma * (d + lam * w)`` at chunk offsets ``offs < count``."""
    mask = offs < count
    raw = tl.load(params + offs, mask=mask, other=0.0)
    d = tl.load(direction + offs, mask=mask, other=0.0)
    w = raw.to(tl.float32)
    u = w - gamma * (d.to(tl.float32) + lam * w)
    tl.store(saved + offs, raw.to(saved.dtype.element_ty), mask=mask)
    tl.store(params + offs, u.to(raw.dtype), mask=mask)
    if ZERO_DIRECTION:
        tl.store(direction + offs, tl.zeros_like(d), mask=mask)


@triton.jit
def _extrapolate_kernel(
    params_table,
    saved_table,
    direction_table,
    hyper_ptr,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    PARAMS_DTYPE: tl.constexpr,
    SAVED_DTYPE: tl.constexpr,
    DIRECTION_DTYPE: tl.constexpr,
    ZERO_DIRECTION: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    seg = tl.load(chunk_segments_ptr + chunk)
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    row = hyper_ptr + seg * _NUM_HYPER
    gamma = tl.load(row + _GAMMA)
    lam = tl.load(row + _WEIGHT_DECAY)
    active = tl.load(row + _ACTIVE) != 0.0  # inactive: every lane masked off
    body = tl.where(active, body, 0)
    count = tl.where(active, count, 0)
    params = chunk_pointer(params_table, seg, start, PARAMS_DTYPE, ALIGNED)
    saved = chunk_pointer(saved_table, seg, start, SAVED_DTYPE, ALIGNED)
    direction = chunk_pointer(direction_table, seg, start, DIRECTION_DTYPE, ALIGNED)
    for step in range(0, CHUNK, BLOCK):
        offs = step + tl.arange(0, BLOCK)
        _extrapolate_block(params, saved, direction, offs, body, gamma, lam, ZERO_DIRECTION)
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        offs = body + tl.arange(0, TAIL)
        _extrapolate_block(params, saved, direction, offs, count, gamma, lam, ZERO_DIRECTION)


@triton.jit
def _extrap_step_block(
    params, saved, grad, momentum, offs, count, eta, gamma, mu, lam, nesterov, EXTRAPOLATE_NEXT: tl.constexpr
):
    """The SGD step from ``saved`` (and the next extrapolation) at chunk offsets ``offs < count``."""
    mask = offs < count
    raw = tl.load(saved + offs, mask=mask, other=0.0)
    w = raw.to(tl.float32)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    decayed = g + lam * w
    m = mu * tl.load(momentum + offs, mask=mask, other=0.0).to(tl.float32) + decayed
    tl.store(momentum + offs, m.to(momentum.dtype.element_ty), mask=mask)
    stored = (w - eta * tl.where(nesterov, decayed + mu * m, m)).to(raw.dtype)
    if EXTRAPOLATE_NEXT:
        w_next = stored.to(tl.float32)
        tl.store(saved + offs, stored, mask=mask)
        next_params = w_next - gamma * (g + lam * w_next)
        tl.store(params + offs, next_params.to(params.dtype.element_ty), mask=mask)
    else:
        tl.store(params + offs, stored.to(params.dtype.element_ty), mask=mask)


@triton.jit
def _extrap_step_kernel(
    params_table,
    saved_table,
    grad_table,
    momentum_table,
    hyper_ptr,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    PARAMS_DTYPE: tl.constexpr,
    SAVED_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    MOMENTUM_DTYPE: tl.constexpr,
    EXTRAPOLATE_NEXT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    seg = tl.load(chunk_segments_ptr + chunk)
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    row = hyper_ptr + seg * _NUM_HYPER
    eta = tl.load(row + _LR)
    gamma = tl.load(row + _GAMMA)
    mu = tl.load(row + _MOMENTUM)
    lam = tl.load(row + _WEIGHT_DECAY)
    nesterov = tl.load(row + _NESTEROV) != 0.0
    active = tl.load(row + _ACTIVE) != 0.0  # inactive: every lane masked off
    body = tl.where(active, body, 0)
    count = tl.where(active, count, 0)
    params = chunk_pointer(params_table, seg, start, PARAMS_DTYPE, ALIGNED)
    saved = chunk_pointer(saved_table, seg, start, SAVED_DTYPE, ALIGNED)
    grad = chunk_pointer(grad_table, seg, start, GRAD_DTYPE, ALIGNED)
    momentum = chunk_pointer(momentum_table, seg, start, MOMENTUM_DTYPE, ALIGNED)
    for step in range(0, CHUNK, BLOCK):
        offs = step + tl.arange(0, BLOCK)
        _extrap_step_block(
            params, saved, grad, momentum, offs, body, eta, gamma, mu, lam, nesterov, EXTRAPOLATE_NEXT
        )
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        offs = body + tl.arange(0, TAIL)
        _extrap_step_block(
            params, saved, grad, momentum, offs, count, eta, gamma, mu, lam, nesterov, EXTRAPOLATE_NEXT
        )


def _block(chunks: ChunkTable) -> int:
    return min(BLOCK, triton.next_power_of_2(chunks.chunk_size))


def _chunk_args(chunks: ChunkTable) -> tuple[torch.Tensor, ...]:
    return chunks.starts, chunks.ends, chunks.body_ends, chunks.chunk_segments


@on_device_of_first
def extrapolate_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    direction: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    zero_direction: bool,
) -> None:
    named = [("params", params), ("saved", saved), ("direction", direction)]
    tables, dtypes, aligned = operand_args(chunks, *named)
    if chunks.num_chunks:
        _extrapolate_kernel[(chunks.num_chunks,)](
            *tables,
            hyper,
            *_chunk_args(chunks),
            PARAMS_DTYPE=dtypes[0],
            SAVED_DTYPE=dtypes[1],
            DIRECTION_DTYPE=dtypes[2],
            ZERO_DIRECTION=zero_direction,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )


@on_device_of_first
def extrap_step_(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    grad: list[torch.Tensor],
    momentum: list[torch.Tensor],
    hyper: torch.Tensor,
    chunks: ChunkTable,
    extrapolate_next: bool,
) -> None:
    named = [("params", params), ("saved", saved), ("grad", grad), ("momentum", momentum)]
    tables, dtypes, aligned = operand_args(chunks, *named)
    if chunks.num_chunks:
        _extrap_step_kernel[(chunks.num_chunks,)](
            *tables,
            hyper,
            *_chunk_args(chunks),
            PARAMS_DTYPE=dtypes[0],
            SAVED_DTYPE=dtypes[1],
            GRAD_DTYPE=dtypes[2],
            MOMENTUM_DTYPE=dtypes[3],
            EXTRAPOLATE_NEXT=extrapolate_next,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )
