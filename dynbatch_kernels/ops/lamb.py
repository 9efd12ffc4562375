"""LAMB / LAMBC: ``lamb_step_`` (the two-pass step; ``lamb_update_`` and ``lamb_apply_`` are its passes
as two calls, for tensors split across processes), and ``segment_sq_norms`` with ``lamb_grad_sq_norm``
(pass 0: the global gradient norm for clipping)."""

from __future__ import annotations

import torch

from dynbatch_kernels.backends import backend_module
from dynbatch_kernels.checks import (
    GRAD_DTYPES,
    Operand,
    as_operand,
    check_device_scalar,
    check_disjoint,
    check_flat,
    check_hyper,
    table_for,
)
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.columns import (
    LAMB_ACTIVE,
    LAMB_ADAPT,
    LAMB_BETA1,
    LAMB_BETA2,
    LAMB_BIAS_CORRECTION,
    LAMB_EPS,
    LAMB_LR,
    LAMB_MAX_GRAD_NORM,
    LAMB_RATIO_MAX,
    LAMB_RATIO_MIN,
    LAMB_WEIGHT_DECAY,
    NUM_LAMB_HYPER,
    NUM_LAMB_STATS,
)
from dynbatch_kernels.ops.argdoc import shared_arg_docs
from dynbatch_kernels.ops.registry import fused_op


def lamb_hyper_row(
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    trust_clip: tuple[float, float] | None = None,
    always_adapt: bool = False,
    bias_correction: bool = True,
    max_grad_norm: float | None = None,
    active: bool = True,
) -> list[float]:
    """One row of the :func:`lamb_step_` hyper-parameter table (not validated here; FusedLAMB does that).

    ``trust_clip=None`` stores the range ``[0, inf]`` (no clipping), ``max_grad_norm=None`` stores ``inf``;
    ``LAMB_ADAPT`` is 1 when ``weight_decay != 0 or always_adapt``; ``active=False`` (``LAMB_ACTIVE = 0``)
    leaves the segment and its state untouched.
    """
    inf = float("inf")
    ratio_min, ratio_max = (0.0, inf) if trust_clip is None else trust_clip
    row = [0.0] * NUM_LAMB_HYPER
    row[LAMB_LR] = lr
    row[LAMB_BETA1], row[LAMB_BETA2] = betas
    row[LAMB_EPS] = eps
    row[LAMB_WEIGHT_DECAY] = weight_decay
    row[LAMB_RATIO_MIN], row[LAMB_RATIO_MAX] = ratio_min, ratio_max
    row[LAMB_ADAPT] = float(weight_decay != 0 or always_adapt)
    row[LAMB_BIAS_CORRECTION] = float(bias_correction)
    row[LAMB_MAX_GRAD_NORM] = inf if max_grad_norm is None else max_grad_norm
    row[LAMB_ACTIVE] = float(active)
    return [float(x) for x in row]


@shared_arg_docs
def segment_sq_norms(
    x: Operand,
    offsets: torch.Tensor | None,
    *,
    scale: torch.Tensor | None = None,
    chunks: ChunkTable | None = None,
) -> torch.Tensor:
    """Per-segment squared norms ``out[j] = sum_i (s*x[i])^2`` in one read-only pass.

    Args:
        x: float32, bfloat16 or float16. {operand}
        offsets: {offsets}
        scale: optional one-element float32 tensor ``s`` on ``x``'s device (e.g. the inverse loss scale),
            applied per element so that a large scale cannot overflow the float32 partial sums.
        chunks: {chunks}

    Returns:
        float32 ``[S]``, each summed per chunk in float32 and over chunks in float64, in a fixed order.
        Bytes per element: one read of ``x`` (4 for float32, 2 for bfloat16/float16).
    """
    x_op = as_operand("x", x, GRAD_DTYPES)
    table = table_for(offsets, [("x", x, x_op)], chunks)
    check_device_scalar("scale", scale, table.offsets)
    return _segment_sq_norms_op(x_op, *table.op_args(), scale)


@shared_arg_docs
def lamb_grad_sq_norm(
    grad: Operand,
    offsets: torch.Tensor | None,
    hyper: torch.Tensor,
    *,
    inv_grad_scale: torch.Tensor | None = None,
    chunks: ChunkTable | None = None,
) -> torch.Tensor:
    """Pass 0 of :func:`lamb_step_`: ``|s*g|^2`` over the active segments, a 0-dim float32 device tensor.

    Pass it as ``grad_sq_norm`` (add the results of several buffers first: the clipping norm is global).
    Costs one read of ``grad``; pass a norm taken from an earlier reduction instead where there is one.

    Args:
        grad, hyper, inv_grad_scale: as for :func:`lamb_step_`.
        offsets: {offsets}
        chunks: {chunks}
    """
    grad_op = as_operand("grad", grad, GRAD_DTYPES)
    table = table_for(offsets, [("grad", grad, grad_op)], chunks)
    check_hyper("hyper", hyper, table.num_segments, NUM_LAMB_HYPER, table.offsets)
    sq = segment_sq_norms(grad, table.offsets, scale=inv_grad_scale, chunks=table)
    return torch.where(hyper[:, LAMB_ACTIVE] != 0, sq, 0.0).sum(dtype=torch.float64).float()


@shared_arg_docs
def lamb_step_(
    param: Operand,
    grad: Operand,
    exp_avg: Operand,
    exp_avg_sq: Operand,
    offsets: torch.Tensor | None,
    *,
    hyper: torch.Tensor,
    step: torch.Tensor,
    master: Operand | None = None,
    update: Operand | None = None,
    grad_sq_norm: torch.Tensor | None = None,
    inv_grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    chunks: ChunkTable | None = None,
) -> torch.Tensor:
    """One LAMB / LAMBC step over a flat buffer, in two passes, with per-segment hyper-parameters.

    Segment ``j`` (one parameter tensor) reads row ``j`` of ``hyper`` (columns ``LAMB_*``: ``lr, beta1,
    beta2, eps, wd, r_min, r_max, adapt, bias_correction, max_grad_norm, active``) and its step count
    ``t = step[j] + 1``. With ``s`` the inverse grad scale and ``G = grad_sq_norm`` (= ``|s*g|^2`` over the
    whole model)::

        c   = max(1, sqrt(G) / max_grad_norm)          (1 without grad_sq_norm)
        g'  = s*g / c
        m  <- beta1*m + (1-beta1)*g' ;   v <- beta2*v + (1-beta2)*g'^2
        u   = (m / bc1) / (sqrt(v / bc2) + eps) + wd*w        (bc_k = 1 - beta_k^t, or 1 without correction)
        r_j = clip(|w|_j / |u|_j, r_min, r_max)  if adapt and |w|_j > 0 and |u|_j > 0, else 1
        w  <- w - lr * r_j * u ;   step[j] <- step[j] + 1

    Pass 1 reads ``g, m, v, w`` and writes ``m, v`` and ``u`` (into ``update``, in its dtype), with
    per-chunk partial sums of ``|w|^2, |u|^2, |s*g|^2``; a per-segment reduction (fixed order, float64)
    then gives ``r_j``; pass 2 reads ``w, u`` and writes ``w``. ``w`` is ``master`` when given (float32
    master weights of bfloat16/float16 parameters; both are written in pass 2), else ``param``.

    Bytes per element: float32 40 (pass 1: 16 read + 12 written; pass 2: 8 + 4), the floor for LAMB through
    memory as ``|u|_j`` must be known before any ``w`` moves (the C++ kernels' waves, under ``update``,
    move 28 for tensors small enough, 32 with ``u`` over the gradient, and of a larger tensor 28 for the
    at most 2**20 elements whose ``u`` stays in scratch, 40 for the rest); bfloat16/float16 with a master
    copy 36, without 28.
    Clipping needs ``G`` before pass 1: from an earlier reduction (e.g. :func:`accumulate_`'s sums) it
    costs nothing; measured by :func:`lamb_grad_sq_norm` (pass 0) it costs one more read of ``grad``
    (+4 bytes float32, +2 bfloat16: 44 bytes in all for float32).

    Skipping: nothing is written (``param, master, grad, m, v, step`` stay bit-identical) when
    ``found_inf != 0`` or ``G`` is given and not finite; in the latter case ``found_inf`` (if given) is set
    to 1. Every decision is taken on the device: no host synchronisation.

    Every tensor operand is either a flat buffer laid out by ``offsets`` or a list of one tensor per
    segment, wherever it lives; mixing both is fine (e.g. parameters and gradients where the model keeps
    them, moments in flat buffers).

    Args:
        param: parameters, float32, bfloat16 or float16; updated in place. {operand}
        grad: the gradient, ``param``'s dtype; overwritten with the update ``u`` (unless skipped) when
            ``update`` is None, else only read.
        exp_avg, exp_avg_sq: float32 moment buffers, updated in place.
        offsets: {offsets}
        hyper: float32 ``[S, NUM_LAMB_HYPER]`` table on the device (rows from :func:`lamb_hyper_row`).
        step: float32 ``[S]`` steps taken so far per segment; incremented in place unless skipped.
        master: float32 master weights for bfloat16/float16 ``param`` (None for float32 ``param``).
        update: where pass 1 stores ``u`` for pass 2 (``param``'s dtype); ``grad`` itself when None.
            The C++ kernels run both passes in waves of consecutive segments of up to 2**20 elements
            together, so that pass 2 finds ``w`` and ``u`` still cached, and keep a wave's ``u`` in a
            scratch buffer of the calling thread's (4 MiB for float32); a larger segment is a wave of
            its own: the ``u`` of the last chunks of each thread's part of it (at most 2**20 in all)
            stays in the scratch, where pass 2, walking backwards, reads it first, and the rest goes to
            a separate ``update`` with streaming stores (no write-allocate reads). Its contents after
            the call are unspecified; where ``update`` is ``grad`` (None, or a segment's same memory)
            the gradient always holds ``u``.
            Tables of chunks too coarse to share a wave among the threads (over
            ``2**20 / (2 * threads)`` elements) run each pass over all chunks instead.
        grad_sq_norm: one-element float32 ``|s*g|^2`` over every segment being clipped together; enables
            clipping (column ``LAMB_MAX_GRAD_NORM``, ``inf`` = not clipped) and the finiteness check.
        inv_grad_scale: one-element float32 ``s`` (a GradScaler's ``1/scale``); 1 when None.
        found_inf: one-element float32 flag; nonzero skips the step.
        chunks: {chunks}

    Returns:
        float32 ``[S, 4]``: columns ``LAMB_W_SQ, LAMB_U_SQ, LAMB_G_SQ`` (``|w|^2, |u|^2, |s*g|^2`` before
        clipping) and ``LAMB_RATIO`` (the ``r_j`` applied; 1 for inactive segments). When the step is
        skipped they describe the update that was not applied.
    """
    args = (param, grad, exp_avg, exp_avg_sq, offsets, hyper, step, master, update, chunks)
    return _pass1_call(_lamb_step_op, *args, grad_sq_norm, inv_grad_scale, found_inf)


@shared_arg_docs
def lamb_update_(
    param: Operand,
    grad: Operand,
    exp_avg: Operand,
    exp_avg_sq: Operand,
    offsets: torch.Tensor | None,
    *,
    hyper: torch.Tensor,
    step: torch.Tensor,
    master: Operand | None = None,
    update: Operand | None = None,
    grad_sq_norm: torch.Tensor | None = None,
    inv_grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    chunks: ChunkTable | None = None,
) -> torch.Tensor:
    """Pass 1 of :func:`lamb_step_` alone: ``m, v`` and ``u`` (into ``update``, or ``grad`` when None),
    unless skipped; ``param``, ``master`` and ``step`` are only read.

    For tensors split across processes (FSDP2 shards): sum the returned norms over the shards of each
    tensor (one all-reduce of the table's first three columns; the ratio column is zero), then call
    :func:`lamb_apply_` with the sums, which takes the trust ratios from them. ``lamb_update_`` then
    ``lamb_apply_`` on the same arguments is :func:`lamb_step_`, bit for bit.

    Args:
        param, grad, exp_avg, exp_avg_sq, hyper, step, master, update, grad_sq_norm, inv_grad_scale,
            found_inf: as for :func:`lamb_step_`.
        offsets: {offsets}
        chunks: {chunks}

    Returns:
        float32 ``[S, 4]``: ``|w|^2, |u|^2, |s*g|^2`` of this call's elements per segment (0 for inactive
        segments) and a ratio column of zeros.
    """
    args = (param, grad, exp_avg, exp_avg_sq, offsets, hyper, step, master, update, chunks)
    return _pass1_call(_lamb_update_op, *args, grad_sq_norm, inv_grad_scale, found_inf)


@shared_arg_docs
def lamb_apply_(
    param: Operand,
    update: Operand,
    offsets: torch.Tensor | None,
    *,
    hyper: torch.Tensor,
    step: torch.Tensor,
    stats: torch.Tensor,
    master: Operand | None = None,
    grad_sq_norm: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    chunks: ChunkTable | None = None,
) -> None:
    """Pass 2 of :func:`lamb_step_` alone: ``r_j`` from ``stats``' ``|w|^2, |u|^2`` columns into its
    ratio column, then (unless skipped) ``w <- w - lr * r_j * u`` and ``step[j] += 1``.

    Args:
        param, hyper, step, master, grad_sq_norm, found_inf: as for :func:`lamb_step_` (the same values
            as in the :func:`lamb_update_` call before: they decide the skip again).
        update: where :func:`lamb_update_` wrote ``u`` (its ``update``, or its ``grad``).
        offsets: {offsets}
        stats: float32 ``[S, 4]`` from :func:`lamb_update_` (norms summed over shards where the tensors
            are split); its ratio column is written.
        chunks: {chunks}
    """
    param_op = as_operand("param", param, GRAD_DTYPES)
    dtype = param_op[0].dtype if param_op else torch.float32
    named = [("param", param, param_op), ("update", update, as_operand("update", update, (dtype,)))]
    named += _master_operand(master, dtype)
    check_disjoint(*((name, given) for name, given, _ in named))
    table = table_for(offsets, named, chunks)
    ops = {name: op for name, _, op in named}
    _check_tables(table, hyper, step)
    check_hyper("stats", stats, table.num_segments, NUM_LAMB_STATS, table.offsets)
    _check_scalars(table, grad_sq_norm=grad_sq_norm, found_inf=found_inf)
    _lamb_apply_op(
        ops["param"],
        ops["update"],
        ops.get("master", []),
        step,
        hyper,
        stats,
        *table.op_args(),
        grad_sq_norm,
        found_inf,
    )


def _master_operand(
    master: Operand | None, dtype: torch.dtype
) -> list[tuple[str, Operand, list[torch.Tensor]]]:
    if master is None:
        return []
    if dtype == torch.float32:
        raise ValueError("master: expected None for float32 param (master weights are for bfloat16/float16)")
    return [("master", master, as_operand("master", master, (torch.float32,)))]


def _pass1_call(
    op, param, grad, exp_avg, exp_avg_sq, offsets, hyper, step, master, update, chunks, *scalars
) -> torch.Tensor:
    """Check the arguments of :func:`lamb_step_` / :func:`lamb_update_` and run ``op`` on them."""
    ops, table = _pass1_operands(
        param, grad, exp_avg, exp_avg_sq, offsets, hyper, step, master, update, chunks
    )
    grad_sq_norm, inv_grad_scale, found_inf = scalars
    _check_scalars(table, grad_sq_norm=grad_sq_norm, inv_grad_scale=inv_grad_scale, found_inf=found_inf)
    return op(
        ops["param"],
        ops["grad"],
        ops.get("update", []),
        ops["exp_avg"],
        ops["exp_avg_sq"],
        ops.get("master", []),
        step,
        hyper,
        *table.op_args(),
        *scalars,
    )


def _pass1_operands(
    param, grad, exp_avg, exp_avg_sq, offsets, hyper, step, master, update, chunks
) -> tuple[dict[str, list[torch.Tensor]], ChunkTable]:
    """The checked operands of pass 1 (by name) and their chunk table."""
    param_op = as_operand("param", param, GRAD_DTYPES)
    dtype = param_op[0].dtype if param_op else torch.float32
    named = [
        ("param", param, param_op),
        ("grad", grad, as_operand("grad", grad, (dtype,))),
        ("exp_avg", exp_avg, as_operand("exp_avg", exp_avg, (torch.float32,))),
        ("exp_avg_sq", exp_avg_sq, as_operand("exp_avg_sq", exp_avg_sq, (torch.float32,))),
    ]
    named += _master_operand(master, dtype)
    if update is not None:
        named.append(("update", update, as_operand("update", update, (dtype,))))
    check_disjoint(*((name, given) for name, given, _ in named))
    table = table_for(offsets, named, chunks)
    _check_tables(table, hyper, step)
    return {name: op for name, _, op in named}, table


def _check_tables(table: ChunkTable, hyper: torch.Tensor, step: torch.Tensor) -> None:
    check_hyper("hyper", hyper, table.num_segments, NUM_LAMB_HYPER, table.offsets)
    check_flat("step", step, (torch.float32,))
    if step.numel() != table.num_segments or step.device != table.offsets.device:
        raise ValueError(
            f"step: expected {table.num_segments} counts (one per segment) on {table.offsets.device}, "
            f"got {step.numel()} on {step.device}"
        )


def _check_scalars(table: ChunkTable, **scalars: torch.Tensor | None) -> None:
    for name, scalar in scalars.items():
        check_device_scalar(name, scalar, table.offsets)


@fused_op("segment_sq_norms", mutates_args=())
def _segment_sq_norms_op(
    x: list[torch.Tensor], table: list[torch.Tensor], sizes: list[int], scale: torch.Tensor | None
) -> torch.Tensor:
    chunks = ChunkTable.from_op_args(table, sizes)
    return backend_module(chunks.offsets.device).segment_sq_norms(x, chunks, scale)


@_segment_sq_norms_op.register_fake
def _(x, table, *rest):
    return table[0].new_empty(table[0].shape[0] - 1, dtype=torch.float32)


def _pass1_op(name: str, mutates_args: tuple[str, ...]):
    """Register ``dynbatch::<name>``, which runs the backend's ``<name>`` (``lamb_step_`` or
    ``lamb_update_``: the same arguments, pass 1 with or without pass 2), and its fake implementation."""

    def run(
        param: list[torch.Tensor],
        grad: list[torch.Tensor],
        update: list[torch.Tensor],
        exp_avg: list[torch.Tensor],
        exp_avg_sq: list[torch.Tensor],
        master: list[torch.Tensor],
        step: torch.Tensor,
        hyper: torch.Tensor,
        table: list[torch.Tensor],
        sizes: list[int],
        grad_sq_norm: torch.Tensor | None,
        inv_grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> torch.Tensor:
        """``update`` and ``master`` are empty lists when absent (a custom op has no optional tensor lists;
        ``u`` then goes into ``grad``)."""
        chunks = ChunkTable.from_op_args(table, sizes)
        backend = getattr(backend_module(chunks.offsets.device), name)
        return backend(
            param,
            grad,
            update or grad,
            exp_avg,
            exp_avg_sq,
            master or None,
            step,
            hyper,
            chunks,
            grad_sq_norm,
            inv_grad_scale,
            found_inf,
        )

    op = fused_op(name, mutates_args=mutates_args)(run)

    @op.register_fake
    def _(param, grad, update, exp_avg, exp_avg_sq, master, step, hyper, table, *rest):
        return table[0].new_empty(table[0].shape[0] - 1, NUM_LAMB_STATS, dtype=torch.float32)

    return op


_lamb_step_op = _pass1_op(
    "lamb_step_", ("param", "grad", "update", "exp_avg", "exp_avg_sq", "master", "step", "found_inf")
)
_lamb_update_op = _pass1_op("lamb_update_", ("grad", "update", "exp_avg", "exp_avg_sq"))


@fused_op("lamb_apply_", mutates_args=("param", "master", "step", "stats", "found_inf"))
def _lamb_apply_op(
    param: list[torch.Tensor],
    update: list[torch.Tensor],
    master: list[torch.Tensor],
    step: torch.Tensor,
    hyper: torch.Tensor,
    stats: torch.Tensor,
    table: list[torch.Tensor],
    sizes: list[int],
    grad_sq_norm: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    """``master`` is an empty list when absent."""
    chunks = ChunkTable.from_op_args(table, sizes)
    backend_module(chunks.offsets.device).lamb_apply_(
        param, update, master or None, step, hyper, stats, chunks, grad_sq_norm, found_inf
    )
