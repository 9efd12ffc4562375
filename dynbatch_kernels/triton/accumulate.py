"""Triton accumulate_: ``acc += s*g`` (or ``out = acc + s*g``) with the per-segment angle sums, in one pass
over the operands."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynbatch_kernels import columns
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.triton.launch import TAIL, chunk_extent, chunk_pointer, on_device_of_first, operand_args
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
def _accumulate_block(acc, out, grad, offs, count, scale, ZERO_GRAD: tl.constexpr):
    """``out = acc + scale * grad`` at chunk offsets ``offs < count`` (``out`` may be ``acc``); the
    elementwise terms of the four sums."""
    mask = offs < count
    old = tl.load(acc + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(grad + offs, mask=mask, other=0.0)
    g = raw.to(tl.float32) * scale
    new = old + g
    tl.store(out + offs, new.to(out.dtype.element_ty), mask=mask)
    if ZERO_GRAD:
        tl.store(grad + offs, tl.zeros_like(raw), mask=mask)
    return old * g, g * g, old * old, new * new


@triton.jit
def _accumulate_kernel(
    acc_table,
    grad_table,
    out_table,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    partials_ptr,
    scale,
    ACC_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ZERO_GRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    seg = tl.load(chunk_segments_ptr + chunk)
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    acc = chunk_pointer(acc_table, seg, start, ACC_DTYPE, ALIGNED)
    grad = chunk_pointer(grad_table, seg, start, GRAD_DTYPE, ALIGNED)
    out = chunk_pointer(out_table, seg, start, ACC_DTYPE, ALIGNED)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    nn = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK):
        terms = _accumulate_block(acc, out, grad, step + tl.arange(0, BLOCK), body, scale, ZERO_GRAD)
        dot += terms[0]
        gg += terms[1]
        aa += terms[2]
        nn += terms[3]
    dot_sum = tl.sum(dot, axis=0)
    gg_sum = tl.sum(gg, axis=0)
    aa_sum = tl.sum(aa, axis=0)
    nn_sum = tl.sum(nn, axis=0)
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        terms = _accumulate_block(acc, out, grad, body + tl.arange(0, TAIL), count, scale, ZERO_GRAD)
        dot_sum += tl.sum(terms[0], axis=0)
        gg_sum += tl.sum(terms[1], axis=0)
        aa_sum += tl.sum(terms[2], axis=0)
        nn_sum += tl.sum(terms[3], axis=0)
    row = partials_ptr + chunk * NUM_SUMS
    tl.store(row + DOT, dot_sum)
    tl.store(row + GG, gg_sum)
    tl.store(row + AA, aa_sum)
    tl.store(row + NN, nn_sum)


@on_device_of_first
def accumulate_(
    acc: list[torch.Tensor],
    grad: list[torch.Tensor],
    chunks: ChunkTable,
    scale: float,
    zero_grad: bool,
    out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    tables, dtypes, aligned = operand_args(chunks, ("acc", acc), ("grad", grad), ("out", out or acc))
    device = chunks.starts.device
    partials = torch.empty(chunks.num_chunks, columns.NUM_ACC_SUMS, dtype=torch.float32, device=device)
    if chunks.num_chunks:
        _accumulate_kernel[(chunks.num_chunks,)](
            *tables,
            chunks.starts,
            chunks.ends,
            chunks.body_ends,
            chunks.chunk_segments,
            partials,
            scale,
            ACC_DTYPE=dtypes[0],
            GRAD_DTYPE=dtypes[1],
            ZERO_GRAD=zero_grad,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=min(BLOCK, triton.next_power_of_2(chunks.chunk_size)),
            num_warps=NUM_WARPS,
        )
    return reduce_segments(partials, chunks)
