"""The fused ops in plain PyTorch: ground truth for the tests, baseline for the benchmarks.

Same signatures as the Triton and C++ backends. Every reduction accumulates in float64, and given
float64 tensors the whole computation is float64 (that is how tests build their ground truth). Each op is
written once, over flat buffers whose segments fill the table; :func:`compacted` runs it on anything else
(per-segment tensors, padding between segments) by copying the used elements into flat buffers and the
results back.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from dynbatch_kernels.chunks import ChunkTable, virtual_bases
from dynbatch_kernels.columns import (
    EXTRAP_ACTIVE,
    EXTRAP_GAMMA,
    EXTRAP_LR,
    EXTRAP_MOMENTUM,
    EXTRAP_NESTEROV,
    EXTRAP_WEIGHT_DECAY,
    LAMB_ACTIVE,
    LAMB_ADAPT,
    LAMB_BETA1,
    LAMB_BETA2,
    LAMB_BIAS_CORRECTION,
    LAMB_EPS,
    LAMB_LR,
    LAMB_MAX_GRAD_NORM,
    LAMB_RATIO,
    LAMB_RATIO_MAX,
    LAMB_RATIO_MIN,
    LAMB_U_SQ,
    LAMB_W_SQ,
    LAMB_WEIGHT_DECAY,
)


class _Compact:
    """The used elements of each operand as one flat buffer per operand (a view when nothing is padded
    and the operand is flat), and their way back."""

    def __init__(self, chunks: ChunkTable, operands: list[list[torch.Tensor]]) -> None:
        self.source = chunks
        full = bool((chunks.host_lengths == chunks.host_offsets.diff()).all())
        self.identity = full and all(len(op) == 1 and op[0].numel() == chunks.num_elements for op in operands)
        self.chunks = chunks
        if not self.identity:
            compact = torch.cat([torch.zeros(1, dtype=torch.int64), chunks.host_lengths.cumsum(0)])
            self.chunks = ChunkTable.from_offsets(compact, device=chunks.offsets.device)
            starts = chunks.host_offsets[:-1]
            self.index = torch.repeat_interleave(starts - compact[:-1], chunks.host_lengths)
            self.index = (self.index + torch.arange(int(compact[-1]))).to(chunks.offsets.device)
        self.taken: dict[int, tuple[list[torch.Tensor], torch.Tensor, bool]] = {}

    def take(self, name: str, operand: list[torch.Tensor], mutated: bool) -> torch.Tensor:
        if id(operand) in self.taken:  # the same list twice (lamb_step_'s update aliasing grad)
            _, flat, was = self.taken[id(operand)]
            self.taken[id(operand)] = (operand, flat, was or mutated)
            return flat
        try:
            virtual_bases(operand, self.source)  # the checks every backend makes
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None
        if self.identity:
            flat = operand[0].view(-1)
        elif len(operand) == 1 and operand[0].numel() == self.source.num_elements:
            flat = operand[0].view(-1)[self.index]
        else:
            device = self.chunks.offsets.device
            flat = torch.cat([t.reshape(-1) for t in operand]) if operand else torch.zeros(0, device=device)
        self.taken[id(operand)] = (operand, flat, mutated)
        return flat

    def give_back(self) -> None:
        if self.identity:
            return
        for operand, flat, mutated in self.taken.values():
            if not mutated:
                continue
            if len(operand) == 1 and operand[0].numel() == self.source.num_elements:
                operand[0].view(-1)[self.index] = flat
            else:
                for tensor, piece in zip(operand, flat.split(self.source.host_lengths.tolist())):
                    tensor.copy_(piece.view_as(tensor))


def compacted(*mutated: str) -> Callable[[Callable], Callable]:
    """Run a flat-buffer implementation on list operands (or padded tables): the list arguments become
    flat copies of their used elements, ``chunks`` their table, and the ``mutated`` ones are copied back."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            given = bound.arguments
            lists = [v for v in given.values() if isinstance(v, list)]
            compact = _Compact(given["chunks"], lists)
            for name, value in list(given.items()):
                if isinstance(value, list):
                    given[name] = compact.take(name, value, name in mutated)
            given["chunks"] = compact.chunks
            out = fn(*bound.args, **bound.kwargs)
            compact.give_back()
            return out

        return run

    return wrap


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` ([N] or [N, k]) over each segment ``[offsets[j], offsets[j+1])`` in float64."""
    return torch.segment_reduce(values.double(), "sum", offsets=offsets, axis=0)


@compacted("acc", "grad", "out")
def accumulate_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    chunks: ChunkTable,
    scale: float,
    zero_grad: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``acc += s*g`` (or ``out = acc + s*g``); per segment ``[acc_old.(s*g), |s*g|^2, |acc_old|^2,
    |acc_new|^2]`` (float32)."""
    old = acc.double()
    step = grad.double() * scale
    new = old + step
    terms = torch.stack([old * step, step * step, old * old, new * new], dim=1)
    sums = segment_sum(terms, chunks.offsets)
    (acc if out is None else out).copy_(new)
    if zero_grad:
        grad.zero_()
    return sums.to(torch.float32)


def per_element(hyper: torch.Tensor, column: int, chunks: ChunkTable, dtype: torch.dtype) -> torch.Tensor:
    """Column ``column`` of a per-segment ``[S, k]`` table, repeated over each segment's elements."""
    lengths = chunks.offsets.diff()
    return torch.repeat_interleave(hyper[:, column].to(dtype), lengths, output_size=chunks.num_elements)


def _compute_dtype(params: torch.Tensor) -> torch.dtype:
    """float64 for float64 parameters (the tests' ground truth), float32 otherwise (as the kernels)."""
    return torch.promote_types(params.dtype, torch.float32)


@compacted("params", "saved", "direction")
def extrapolate_(
    params: torch.Tensor,
    saved: torch.Tensor,
    direction: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    zero_direction: bool,
) -> None:
    """``saved <- w``; ``w <- w - gamma * (d + lam * w)`` per segment; ``d <- 0`` if ``zero_direction``."""
    dtype = _compute_dtype(params)
    gamma = per_element(hyper, EXTRAP_GAMMA, chunks, dtype)
    lam = per_element(hyper, EXTRAP_WEIGHT_DECAY, chunks, dtype)
    active = per_element(hyper, EXTRAP_ACTIVE, chunks, dtype) != 0
    w = params.to(dtype)
    saved.copy_(torch.where(active, params, saved))
    params.copy_(torch.where(active, w - gamma * (direction.to(dtype) + lam * w), w))
    if zero_direction:
        direction.masked_fill_(active, 0)


@compacted("params", "saved", "momentum")
def extrap_step_(
    params: torch.Tensor,
    saved: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    extrapolate_next: bool,
) -> None:
    """``m <- mu m + g + lam w``; ``w' = w - eta (g + lam w + mu m)`` (Nesterov) or ``w - eta m`` from
    ``w = saved``; with ``extrapolate_next``, then :func:`extrapolate_` from ``w'`` along ``g``. Inactive
    segments are left untouched."""
    dtype = _compute_dtype(params)
    eta, mu, lam, nesterov, active = (
        per_element(hyper, col, chunks, dtype)
        for col in (EXTRAP_LR, EXTRAP_MOMENTUM, EXTRAP_WEIGHT_DECAY, EXTRAP_NESTEROV, EXTRAP_ACTIVE)
    )
    active = active != 0
    w = saved.to(dtype)
    g = grad.to(dtype)
    decayed = g + lam * w
    m = mu * momentum.to(dtype) + decayed
    update = torch.where(nesterov != 0, decayed + mu * m, m)
    momentum.copy_(torch.where(active, m, momentum))
    params.copy_(torch.where(active, w - eta * update, params.to(dtype)))
    if extrapolate_next:
        extrapolate_.__wrapped__(params, saved, grad, hyper, chunks, False)


@compacted()
def segment_sq_norms(x: torch.Tensor, chunks: ChunkTable, scale: torch.Tensor | None) -> torch.Tensor:
    """``sum (s*x)^2`` per segment, accumulated in float64."""
    dtype = _compute_dtype(x)
    scaled = x.to(dtype) if scale is None else x.to(dtype) * scale.to(dtype).reshape(())
    return segment_sum(scaled * scaled, chunks.offsets).to(dtype)


def _skipped(grad_sq_norm: torch.Tensor | None, found_inf: torch.Tensor | None, device) -> torch.Tensor:
    """Whether the step is skipped (a 0-dim bool on the device): ``found_inf != 0`` or a non-finite norm."""
    skipped = torch.zeros((), dtype=torch.bool, device=device)
    if found_inf is not None:
        skipped = skipped | (found_inf.reshape(()) != 0)
    if grad_sq_norm is not None:
        skipped = skipped | ~torch.isfinite(grad_sq_norm.double().reshape(()))
    return skipped


def _segment_of_elements(chunks: ChunkTable, device: torch.device) -> torch.Tensor:
    segment = torch.arange(chunks.num_segments, device=device)
    return torch.repeat_interleave(segment, chunks.offsets.diff(), output_size=chunks.num_elements)


@compacted("update", "exp_avg", "exp_avg_sq")
def lamb_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    update: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    step: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    grad_sq_norm: torch.Tensor | None,
    inv_grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> torch.Tensor:
    """Pass 1 of :func:`dynbatch_kernels.ops.lamb_step_` as whole-buffer tensor expressions: ``m, v`` and
    ``u`` (into ``update``), and the ``[S, 4]`` statistics with the ratio column 0.

    Per-segment coefficients are spread over their segment's elements one at a time (bounded memory);
    ``torch.where`` keeps the buffers of a skipped step or an inactive segment bit-identical without
    reading the skip decision on the host.
    """
    dtype = _compute_dtype(param)
    h = hyper.double()  # per-segment coefficients in float64, elementwise math in dtype
    t = step.double() + 1
    correct = h[:, LAMB_BIAS_CORRECTION] != 0
    inv_bc1 = torch.where(correct, 1 / (1 - h[:, LAMB_BETA1] ** t), 1.0)
    inv_sqrt_bc2 = torch.where(correct, (1 - h[:, LAMB_BETA2] ** t).rsqrt(), 1.0)
    s = torch.ones((), dtype=torch.float64, device=param.device)
    if inv_grad_scale is not None:
        s = inv_grad_scale.double().reshape(())
    clip = torch.ones_like(t)
    if grad_sq_norm is not None:
        clip = (grad_sq_norm.double().reshape(()).sqrt() / h[:, LAMB_MAX_GRAD_NORM]).clamp(min=1.0)
    active = h[:, LAMB_ACTIVE] != 0
    write = active & ~_skipped(grad_sq_norm, found_inf, param.device)
    coef = torch.stack(
        [
            s / clip,
            h[:, LAMB_BETA1],
            h[:, LAMB_BETA2],
            inv_bc1,
            inv_sqrt_bc2,
            h[:, LAMB_EPS],
            h[:, LAMB_WEIGHT_DECAY],
        ],
        dim=1,
    )
    # the segment of every element, expanded once; each coefficient is then one gather
    segment = _segment_of_elements(chunks, param.device)
    spread = lambda k: coef[:, k].to(dtype).index_select(0, segment)

    w = (param if master is None else master).to(dtype)
    g = grad.to(dtype)
    g_sq = segment_sum((g * s.to(dtype)) ** 2, chunks.offsets)
    g = g * spread(0)
    beta1 = spread(1)
    m = beta1 * exp_avg.to(dtype) + (1 - beta1) * g
    beta2 = spread(2)
    v = beta2 * exp_avg_sq.to(dtype) + (1 - beta2) * g * g
    del g, beta1, beta2
    u = m * spread(3) / (v.sqrt() * spread(4) + spread(5)) + spread(6) * w
    sums = torch.stack([segment_sum(w * w, chunks.offsets), segment_sum(u * u, chunks.offsets), g_sq], dim=1)
    sums = torch.where(active[:, None], sums, 0.0)  # inactive: 0, as the kernels
    mask = write.index_select(0, segment)
    for buf, value in ((exp_avg, m), (exp_avg_sq, v), (update, u)):
        buf.copy_(torch.where(mask, value, buf))
    return torch.cat([sums, torch.zeros_like(sums[:, :1])], dim=1).to(dtype)


@compacted("param", "master")
def lamb_apply_(
    param: torch.Tensor,
    update: torch.Tensor,
    master: torch.Tensor | None,
    step: torch.Tensor,
    hyper: torch.Tensor,
    stats: torch.Tensor,
    chunks: ChunkTable,
    grad_sq_norm: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """Pass 2 of :func:`dynbatch_kernels.ops.lamb_step_`: the trust ratios from ``stats``' norms into its
    ratio column, then ``w -= lr * r * u`` and ``step += 1`` unless skipped."""
    dtype = _compute_dtype(param)
    h = hyper.double()
    w_sq, u_sq = stats[:, LAMB_W_SQ].double(), stats[:, LAMB_U_SQ].double()
    adapt = (h[:, LAMB_ADAPT] != 0) & (w_sq > 0) & (u_sq > 0)
    ratio = (w_sq.sqrt() / u_sq.sqrt()).clamp(h[:, LAMB_RATIO_MIN], h[:, LAMB_RATIO_MAX])
    ratio = torch.where(adapt, ratio, 1.0)
    stats[:, LAMB_RATIO] = ratio.to(stats.dtype)
    write = (h[:, LAMB_ACTIVE] != 0) & ~_skipped(grad_sq_norm, found_inf, param.device)
    segment = _segment_of_elements(chunks, param.device)
    w = (param if master is None else master).to(dtype)
    new_w = w - (h[:, LAMB_LR] * ratio).to(dtype).index_select(0, segment) * update.to(dtype)
    mask = write.index_select(0, segment)
    for buf in (param, master):
        if buf is not None:
            buf.copy_(torch.where(mask, new_w, buf))
    step.add_(write.to(step.dtype))
    if found_inf is not None and grad_sq_norm is not None:
        found_inf.masked_fill_(~torch.isfinite(grad_sq_norm.reshape(())), 1.0)


@compacted("param", "update", "exp_avg", "exp_avg_sq", "master")
def lamb_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    update: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    master: torch.Tensor | None,
    step: torch.Tensor,
    hyper: torch.Tensor,
    chunks: ChunkTable,
    grad_sq_norm: torch.Tensor | None,
    inv_grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`dynbatch_kernels.ops.lamb_step_`: :func:`lamb_update_` then :func:`lamb_apply_`."""
    stats = lamb_update_.__wrapped__(
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
    lamb_apply_.__wrapped__(param, update, master, step, hyper, stats, chunks, grad_sq_norm, found_inf)
    return stats
