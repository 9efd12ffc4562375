"""Triton accumulate_: ``acc += s*g`` with the per-segment angle sums, in one pass over the buffer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynbatch_kernels import columns
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.triton.launch import load_bound, on_device_of_first
from dynbatch_kernels.triton.segments import reduce_segments

#: Elements per loop step inside a chunk (a documented fixed choice: 1024 float32 = 4 KiB per tensor,
#: four warps, eight 16-byte vectors per thread in flight).
BLOCK = 1024
NUM_WARPS = 4

# Columns of the partial sums, as compile-time constants.
DOT = tl.constexpr(columns.ACC_DOT)
GG = tl.constexpr(columns.GRAD_SQ)
AA = tl.constexpr(columns.ACC_OLD_SQ)
NN = tl.constexpr(columns.ACC_NEW_SQ)
NUM_SUMS = tl.constexpr(columns.NUM_ACC_SUMS)


@triton.jit
def _accumulate_kernel(
    acc_ptr,
    grad_ptr,
    starts_ptr,
    ends_ptr,
    partials_ptr,
    scale,
    ZERO_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    start = load_bound(starts_ptr + chunk, ALIGNED)
    end = load_bound(ends_ptr + chunk, ALIGNED)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    nn = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK):
        idx = start + step + tl.arange(0, BLOCK)
        mask = idx < end
        old = tl.load(acc_ptr + idx, mask=mask, other=0.0)
        raw = tl.load(grad_ptr + idx, mask=mask, other=0.0)
        g = raw.to(tl.float32) * scale
        new = old + g
        tl.store(acc_ptr + idx, new, mask=mask)
        if ZERO_GRAD:
            tl.store(grad_ptr + idx, tl.zeros_like(raw), mask=mask)
        dot += old * g
        gg += g * g
        aa += old * old
        nn += new * new
    out = partials_ptr + chunk * NUM_SUMS
    tl.store(out + DOT, tl.sum(dot, axis=0))
    tl.store(out + GG, tl.sum(gg, axis=0))
    tl.store(out + AA, tl.sum(aa, axis=0))
    tl.store(out + NN, tl.sum(nn, axis=0))


@on_device_of_first
def accumulate_(
    acc: torch.Tensor, grad: torch.Tensor, chunks: ChunkTable, scale: float, zero_grad: bool
) -> torch.Tensor:
    partials = torch.empty(chunks.num_chunks, columns.NUM_ACC_SUMS, dtype=torch.float32, device=acc.device)
    if chunks.num_chunks:
        _accumulate_kernel[(chunks.num_chunks,)](
            acc,
            grad,
            chunks.starts,
            chunks.ends,
            partials,
            scale,
            ZERO_GRAD=zero_grad,
            ALIGNED=chunks.aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=min(BLOCK, triton.next_power_of_2(chunks.chunk_size)),
            num_warps=NUM_WARPS,
        )
    return reduce_segments(partials, chunks)
