"""Triton LAMB / LAMBC: the two passes of :func:`dynbatch_kernels.ops.lamb_step_`, and pass 0.

Launches per step: pass 1 (one program per chunk: ``m, v``, ``u`` into ``update`` and partial sums), the
shared segment reduction, a per-segment kernel (trust ratios, step counts, ``found_inf``), pass 2 (one
program per chunk: ``w -= lr * r * u``, reading ``u`` back from ``update``, which may alias ``grad``).
Every skip decision is made by each program from ``found_inf`` and the global norm on the device, so
nothing waits for the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynbatch_kernels import columns
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.triton.launch import TAIL, chunk_extent, chunk_pointer, on_device_of_first, operand_args
from dynbatch_kernels.triton.segments import reduce_segments

#: Elements per loop step inside a chunk, and warps per program: the documented fixed choice of
#: :mod:`dynbatch_kernels.triton.accumulate` (1024 float32 = 4 KiB per tensor, eight 16-byte vectors per
#: thread in flight).
BLOCK = 1024
NUM_WARPS = 4
#: Segments per program of the trust-ratio kernel.
SEGMENT_BLOCK = 256

# Table columns as compile-time constants (the kernels index the hyper-parameter and statistics rows).
LR = tl.constexpr(columns.LAMB_LR)
BETA1 = tl.constexpr(columns.LAMB_BETA1)
BETA2 = tl.constexpr(columns.LAMB_BETA2)
EPS = tl.constexpr(columns.LAMB_EPS)
WEIGHT_DECAY = tl.constexpr(columns.LAMB_WEIGHT_DECAY)
RATIO_MIN = tl.constexpr(columns.LAMB_RATIO_MIN)
RATIO_MAX = tl.constexpr(columns.LAMB_RATIO_MAX)
ADAPT = tl.constexpr(columns.LAMB_ADAPT)
BIAS_CORRECTION = tl.constexpr(columns.LAMB_BIAS_CORRECTION)
MAX_GRAD_NORM = tl.constexpr(columns.LAMB_MAX_GRAD_NORM)
ACTIVE = tl.constexpr(columns.LAMB_ACTIVE)
NUM_HYPER = tl.constexpr(columns.NUM_LAMB_HYPER)
W_SQ = tl.constexpr(columns.LAMB_W_SQ)
U_SQ = tl.constexpr(columns.LAMB_U_SQ)
G_SQ = tl.constexpr(columns.LAMB_G_SQ)
RATIO = tl.constexpr(columns.LAMB_RATIO)
NUM_STATS = tl.constexpr(columns.NUM_LAMB_STATS)


@triton.jit
def _norm_is_bad(norm_sq_ptr):
    """The global squared norm is not finite."""
    norm_sq = tl.load(norm_sq_ptr)
    return (norm_sq != norm_sq) | (norm_sq == float("inf"))


@triton.jit
def _skipped(norm_sq_ptr, found_inf_ptr, HAS_NORM: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """The step is skipped: ``found_inf != 0`` or a non-finite global norm (a boolean scalar tensor)."""
    flag = tl.zeros([], dtype=tl.float32)
    if HAS_FOUND_INF:
        flag = tl.load(found_inf_ptr)
    if HAS_NORM:
        flag = tl.where(_norm_is_bad(norm_sq_ptr), 1.0, flag)
    return flag != 0


@triton.jit
def _sq_norm_block(x, offs, count, scale):
    """``(scale * x)^2`` at chunk offsets ``offs < count`` (0 elsewhere)."""
    value = tl.load(x + offs, mask=offs < count, other=0.0).to(tl.float32) * scale
    return value * value


@triton.jit
def _sq_norm_kernel(
    x_table,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    partials_ptr,
    scale_ptr,
    X_DTYPE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    x = chunk_pointer(x_table, tl.load(chunk_segments_ptr + chunk), start, X_DTYPE, ALIGNED)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK):
        total += _sq_norm_block(x, step + tl.arange(0, BLOCK), body, scale)
    total_sum = tl.sum(total, axis=0)
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        total_sum += tl.sum(_sq_norm_block(x, body + tl.arange(0, TAIL), count, scale), axis=0)
    tl.store(partials_ptr + chunk, total_sum)


@triton.jit
def _update_block(
    w_ptr,
    grad_ptr,
    update_ptr,
    m_ptr,
    v_ptr,
    offs,
    count,
    store_count,
    grad_scale,
    inv_scale,
    beta1,
    beta2,
    eps,
    weight_decay,
    inv_bc1,
    inv_sqrt_bc2,
):
    """Pass 1 at chunk offsets ``offs < count``: ``m, v, u`` (stored below ``store_count``); the
    elementwise terms of ``|w|^2, |u|^2, |g/scale|^2``."""
    mask = offs < count
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = raw * grad_scale
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    u = tl.where(mask, tl.div_rn(m * inv_bc1, denom) + weight_decay * w, 0.0)
    stored = offs < store_count
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=stored)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=stored)
    tl.store(update_ptr + offs, u.to(update_ptr.dtype.element_ty), mask=stored)
    unscaled = raw * inv_scale
    return w * w, u * u, unscaled * unscaled


@triton.jit
def _update_kernel(
    w_table,
    grad_table,
    update_table,
    m_table,
    v_table,
    hyper_ptr,
    step_ptr,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    partials_ptr,
    norm_sq_ptr,
    inv_scale_ptr,
    found_inf_ptr,
    W_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    UPDATE_DTYPE: tl.constexpr,
    M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1 on one chunk: ``m, v`` and ``u`` (into update), partial ``|w|^2, |u|^2, |s*g|^2``."""
    chunk = tl.program_id(0)
    seg = tl.load(chunk_segments_ptr + chunk)
    row = hyper_ptr + seg * NUM_HYPER
    active = tl.load(row + ACTIVE) != 0
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    body = tl.where(active, body, 0)
    count = tl.where(active, count, 0)
    skipped = _skipped(norm_sq_ptr, found_inf_ptr, HAS_NORM, HAS_FOUND_INF)
    store_body = tl.where(skipped, 0, body)
    store_count = tl.where(skipped, 0, count)
    w = chunk_pointer(w_table, seg, start, W_DTYPE, ALIGNED)
    grad = chunk_pointer(grad_table, seg, start, GRAD_DTYPE, ALIGNED)
    update = chunk_pointer(update_table, seg, start, UPDATE_DTYPE, ALIGNED)
    m = chunk_pointer(m_table, seg, start, M_DTYPE, ALIGNED)
    v = chunk_pointer(v_table, seg, start, V_DTYPE, ALIGNED)
    beta1 = tl.load(row + BETA1)
    beta2 = tl.load(row + BETA2)
    eps = tl.load(row + EPS)
    weight_decay = tl.load(row + WEIGHT_DECAY)
    # Bias corrections 1 - beta^t in float64 (no cancellation at small t), once per program.
    t = tl.load(step_ptr + seg).to(tl.float64) + 1.0
    correct = tl.load(row + BIAS_CORRECTION) != 0
    bc1 = tl.where(correct, 1.0 - tl.exp(t * tl.log(beta1.to(tl.float64))), 1.0)
    bc2 = tl.where(correct, 1.0 - tl.exp(t * tl.log(beta2.to(tl.float64))), 1.0)
    inv_bc1 = (1.0 / bc1).to(tl.float32)
    inv_sqrt_bc2 = (1.0 / tl.sqrt(bc2)).to(tl.float32)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    grad_scale = inv_scale
    if HAS_NORM:
        clip = tl.maximum(tl.sqrt_rn(tl.load(norm_sq_ptr)) / tl.load(row + MAX_GRAD_NORM), 1.0)
        grad_scale = inv_scale / clip
    ww = tl.zeros([BLOCK], dtype=tl.float32)
    uu = tl.zeros([BLOCK], dtype=tl.float32)
    gg = tl.zeros([BLOCK], dtype=tl.float32)
    for offset in range(0, CHUNK, BLOCK):
        terms = _update_block(
            w, grad, update, m, v, offset + tl.arange(0, BLOCK), body, store_body, grad_scale, inv_scale,
            beta1, beta2, eps, weight_decay, inv_bc1, inv_sqrt_bc2,
        )  # fmt: skip
        ww += terms[0]
        uu += terms[1]
        gg += terms[2]
    ww_sum = tl.sum(ww, axis=0)
    uu_sum = tl.sum(uu, axis=0)
    gg_sum = tl.sum(gg, axis=0)
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        terms = _update_block(
            w, grad, update, m, v, body + tl.arange(0, TAIL), count, store_count, grad_scale, inv_scale,
            beta1, beta2, eps, weight_decay, inv_bc1, inv_sqrt_bc2,
        )  # fmt: skip
        ww_sum += tl.sum(terms[0], axis=0)
        uu_sum += tl.sum(terms[1], axis=0)
        gg_sum += tl.sum(terms[2], axis=0)
    out = partials_ptr + chunk * NUM_STATS
    tl.store(out + W_SQ, ww_sum)
    tl.store(out + U_SQ, uu_sum)
    tl.store(out + G_SQ, gg_sum)
    tl.store(out + RATIO, 0.0)


@triton.jit
def _ratio_kernel(
    stats_ptr,
    hyper_ptr,
    step_ptr,
    norm_sq_ptr,
    found_inf_ptr,
    num_segments,
    HAS_NORM: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    SEGMENT_BLOCK: tl.constexpr,
):
    """Per segment: the clipped trust ratio into ``stats[:, RATIO]``, ``step += 1`` unless skipped."""
    segs = tl.program_id(0) * SEGMENT_BLOCK + tl.arange(0, SEGMENT_BLOCK)
    valid = segs < num_segments
    rows = stats_ptr + segs * NUM_STATS
    w_sq = tl.load(rows + W_SQ, mask=valid, other=0.0)
    u_sq = tl.load(rows + U_SQ, mask=valid, other=0.0)
    hyper = hyper_ptr + segs * NUM_HYPER
    adapt = tl.load(hyper + ADAPT, mask=valid, other=0.0) != 0
    ratio = tl.div_rn(tl.sqrt_rn(w_sq), tl.sqrt_rn(tl.where(u_sq > 0, u_sq, 1.0)))
    ratio = tl.minimum(
        tl.maximum(ratio, tl.load(hyper + RATIO_MIN, mask=valid)), tl.load(hyper + RATIO_MAX, mask=valid)
    )
    ratio = tl.where(adapt & (w_sq > 0) & (u_sq > 0), ratio, 1.0)
    tl.store(rows + RATIO, ratio, mask=valid)
    skip = _skipped(norm_sq_ptr, found_inf_ptr, HAS_NORM, HAS_FOUND_INF)
    active = tl.load(hyper + ACTIVE, mask=valid, other=0.0) != 0
    steps = tl.load(step_ptr + segs, mask=valid, other=0.0)
    tl.store(step_ptr + segs, steps + tl.where(skip, 0.0, 1.0), mask=valid & active)
    if HAS_NORM and HAS_FOUND_INF:  # a program reading found_inf before this store sees the bad norm itself
        tl.store(found_inf_ptr, 1.0, mask=_norm_is_bad(norm_sq_ptr) & (tl.program_id(0) == 0))


@triton.jit
def _apply_block(w_ptr, param_ptr, update_ptr, offs, count, scale, HAS_MASTER: tl.constexpr):
    """Pass 2 at chunk offsets ``offs < count``: ``w -= scale * u`` (and the parameters, given a master)."""
    mask = offs < count
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    update = tl.load(update_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    new = w - scale * update
    tl.store(w_ptr + offs, new.to(w_ptr.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(param_ptr + offs, new.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(
    w_table,
    param_table,
    update_table,
    stats_ptr,
    hyper_ptr,
    starts_ptr,
    ends_ptr,
    body_ends_ptr,
    chunk_segments_ptr,
    norm_sq_ptr,
    found_inf_ptr,
    W_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    UPDATE_DTYPE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2 on one chunk: ``w -= lr * r * u`` into ``w`` (the master copy, if any) and the parameters."""
    chunk = tl.program_id(0)
    seg = tl.load(chunk_segments_ptr + chunk)
    row = hyper_ptr + seg * NUM_HYPER
    write = (tl.load(row + ACTIVE) != 0) & ~_skipped(norm_sq_ptr, found_inf_ptr, HAS_NORM, HAS_FOUND_INF)
    start, body, count = chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED)
    body = tl.where(write, body, 0)
    count = tl.where(write, count, 0)
    w = chunk_pointer(w_table, seg, start, W_DTYPE, ALIGNED)
    param = chunk_pointer(param_table, seg, start, PARAM_DTYPE, ALIGNED)
    update = chunk_pointer(update_table, seg, start, UPDATE_DTYPE, ALIGNED)
    scale = tl.load(row + LR) * tl.load(stats_ptr + seg * NUM_STATS + RATIO)
    for offset in range(0, CHUNK, BLOCK):
        _apply_block(w, param, update, offset + tl.arange(0, BLOCK), body, scale, HAS_MASTER)
    if ALIGNED:  # the tail after the vector body, under ALIGN elements
        _apply_block(w, param, update, body + tl.arange(0, TAIL), count, scale, HAS_MASTER)


def _block(chunks: ChunkTable) -> int:
    return min(BLOCK, triton.next_power_of_2(chunks.chunk_size))


def _chunk_args(chunks: ChunkTable) -> tuple[torch.Tensor, ...]:
    return chunks.starts, chunks.ends, chunks.body_ends, chunks.chunk_segments


@on_device_of_first
def segment_sq_norms(x: list[torch.Tensor], chunks: ChunkTable, scale: torch.Tensor | None) -> torch.Tensor:
    (table,), (dtype,), aligned = operand_args(chunks, ("x", x))
    partials = torch.empty(chunks.num_chunks, 1, dtype=torch.float32, device=chunks.starts.device)
    if chunks.num_chunks:
        _sq_norm_kernel[(chunks.num_chunks,)](
            table,
            *_chunk_args(chunks),
            partials,
            scale,
            X_DTYPE=dtype,
            HAS_SCALE=scale is not None,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )
    return reduce_segments(partials, chunks).view(-1)


@on_device_of_first
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
    w = ("param", param) if master is None else ("master", master)
    named = [w, ("grad", grad), ("update", update), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)]
    tables, dtypes, aligned = operand_args(chunks, *named)
    partials = torch.empty(chunks.num_chunks, NUM_STATS, dtype=torch.float32, device=chunks.starts.device)
    if chunks.num_chunks:
        _update_kernel[(chunks.num_chunks,)](
            *tables,
            hyper,
            step,
            *_chunk_args(chunks),
            partials,
            grad_sq_norm,
            inv_grad_scale,
            found_inf,
            W_DTYPE=dtypes[0],
            GRAD_DTYPE=dtypes[1],
            UPDATE_DTYPE=dtypes[2],
            M_DTYPE=dtypes[3],
            V_DTYPE=dtypes[4],
            HAS_SCALE=inv_grad_scale is not None,
            HAS_NORM=grad_sq_norm is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
        )
    return reduce_segments(partials, chunks)


@on_device_of_first
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
    named = [("param", param), ("update", update)] + ([] if master is None else [("master", master)])
    tables, dtypes, aligned = operand_args(chunks, *named)
    param_t, update_t = tables[:2]
    w_t, w_dtype = (param_t, dtypes[0]) if master is None else (tables[2], dtypes[2])
    flags = dict(HAS_NORM=grad_sq_norm is not None, HAS_FOUND_INF=found_inf is not None)
    if chunks.num_segments:
        _ratio_kernel[(triton.cdiv(chunks.num_segments, SEGMENT_BLOCK),)](
            stats,
            hyper,
            step,
            grad_sq_norm,
            found_inf,
            chunks.num_segments,
            SEGMENT_BLOCK=SEGMENT_BLOCK,
            **flags,
        )
    if chunks.num_chunks:
        _apply_kernel[(chunks.num_chunks,)](
            w_t,
            param_t,
            update_t,
            stats,
            hyper,
            *_chunk_args(chunks),
            grad_sq_norm,
            found_inf,
            W_DTYPE=w_dtype,
            PARAM_DTYPE=dtypes[0],
            UPDATE_DTYPE=dtypes[1],
            HAS_MASTER=master is not None,
            ALIGNED=aligned,
            CHUNK=chunks.chunk_size,
            BLOCK=_block(chunks),
            num_warps=NUM_WARPS,
            **flags,
        )


def lamb_step_(
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
    """Pass 1, the trust ratios, pass 2: three launches (the two halves below)."""
    stats = lamb_update_(
        param,
        grad,
        update,
        exp_avg,
        exp_avg_sq,
        master,
        step,
        hyper,
        chunks,
        grad_sq_norm,
        inv_grad_scale,
        found_inf,
    )
    lamb_apply_(param, update, master, step, hyper, stats, chunks, grad_sq_norm, found_inf)
    return stats
