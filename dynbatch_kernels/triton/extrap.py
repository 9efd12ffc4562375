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
from dynbatch_kernels.triton.launch import load_bound, on_device_of_first

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
def _extrapolate_kernel(
    params_ptr,
    saved_ptr,
    direction_ptr,
    hyper_ptr,
    starts_ptr,
    ends_ptr,
    chunk_segments_ptr,
    ZERO_DIRECTION: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    start = load_bound(starts_ptr + chunk, ALIGNED)
    end = load_bound(ends_ptr + chunk, ALIGNED)
    row = hyper_ptr + tl.load(chunk_segments_ptr + chunk) * _NUM_HYPER
    gamma = tl.load(row + _GAMMA)
    lam = tl.load(row + _WEIGHT_DECAY)
    end = tl.where(tl.load(row + _ACTIVE) != 0.0, end, start)  # inactive: every lane masked off
    for step in range(0, CHUNK, BLOCK):
        idx = start + step + tl.arange(0, BLOCK)
        mask = idx < end
        raw = tl.load(params_ptr + idx, mask=mask, other=0.0)
        d = tl.load(direction_ptr + idx, mask=mask, other=0.0)
        w = raw.to(tl.float32)
        u = w - gamma * (d.to(tl.float32) + lam * w)
        tl.store(saved_ptr + idx, raw, mask=mask)
        tl.store(params_ptr + idx, u.to(raw.dtype), mask=mask)
        if ZERO_DIRECTION:
            tl.store(direction_ptr + idx, tl.zeros_like(d), mask=mask)


@triton.jit
def _extrap_step_kernel(
    params_ptr,
    saved_ptr,
    grad_ptr,
    momentum_ptr,
    hyper_ptr,
    starts_ptr,
    ends_ptr,
    chunk_segments_ptr,
    EXTRAPOLATE_NEXT: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    start = load_bound(starts_ptr + chunk, ALIGNED)
    end = load_bound(ends_ptr + chunk, ALIGNED)
    row = hyper_ptr + tl.load(chunk_segments_ptr + chunk) * _NUM_HYPER
    eta = tl.load(row + _LR)
    gamma = tl.load(row + _GAMMA)
    mu = tl.load(row + _MOMENTUM)
    lam = tl.load(row + _WEIGHT_DECAY)
    nesterov = tl.load(row + _NESTEROV) != 0.0
    end = tl.where(tl.load(row + _ACTIVE) != 0.0, end, start)  # inactive: every lane masked off
    for step in range(0, CHUNK, BLOCK):
        idx = start + step + tl.arange(0, BLOCK)
        mask = idx < end
        raw = tl.load(saved_ptr + idx, mask=mask, other=0.0)
        w = raw.to(tl.float32)
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        decayed = g + lam * w
        m = mu * tl.load(momentum_ptr + idx, mask=mask, other=0.0) + decayed
        tl.store(momentum_ptr + idx, m, mask=mask)
        stored = (w - eta * tl.where(nesterov, decayed + mu * m, m)).to(raw.dtype)
        if EXTRAPOLATE_NEXT:
            w_next = stored.to(tl.float32)
            tl.store(saved_ptr + idx, stored, mask=mask)
            tl.store(params_ptr + idx, (w_next - gamma * (g + lam * w_next)).to(raw.dtype), mask=mask)
        else:
            tl.store(params_ptr + idx, stored, mask=mask)


def _block(chunks: ChunkTable) -> int:
    return min(BLOCK, triton.next_power_of_2(chunks.chunk_size))


@on_device_of_first
def extrapolate_(
    params: torch.Tensor,
    saved: torch.Tensor,
    direction: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    zero_direction: bool,
) -> None:
    if chunks.num_chunks:
        _extrapolate_kernel[(chunks.num_chunks,)](
            params,
            saved,
            direction,
            hyper,
            chunks.starts,
            chunks.ends,
            chunks.chunk_segments,
            ZERO_DIRECTION=zero_direction,
            ALIGNED=chunks.aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )


@on_device_of_first
def extrap_step_(
    params: torch.Tensor,
    saved: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    extrapolate_next: bool,
) -> None:
    if chunks.num_chunks:
        _extrap_step_kernel[(chunks.num_chunks,)](
            params,
            saved,
            grad,
            momentum,
            hyper,
            chunks.starts,
            chunks.ends,
            chunks.chunk_segments,
            EXTRAPOLATE_NEXT=extrapolate_next,
            ALIGNED=chunks.aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )
