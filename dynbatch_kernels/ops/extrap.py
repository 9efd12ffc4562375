"""Extrapolated SGD [Lin20]: ``extrapolate_`` (the extrapolation pass) and ``extrap_step_`` (the update)."""

from __future__ import annotations

import torch

from dynbatch_kernels.backends import backend_module
from dynbatch_kernels.checks import GRAD_DTYPES, Operand, as_operand, check_disjoint, check_hyper, table_for
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.columns import (
    EXTRAP_ACTIVE,
    EXTRAP_GAMMA,
    EXTRAP_LR,
    EXTRAP_MOMENTUM,
    EXTRAP_NESTEROV,
    EXTRAP_WEIGHT_DECAY,
    NUM_EXTRAP_HYPER,
)
from dynbatch_kernels.ops.argdoc import shared_arg_docs
from dynbatch_kernels.ops.registry import fused_op


def extrap_hyper_row(
    *,
    lr: float,
    extrapolation_lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    active: bool = True,
) -> list[float]:
    """One row of the :func:`extrapolate_` / :func:`extrap_step_` hyper-parameter table (not validated here;
    ExtrapSGD does that): ``eta``, ``gamma``, ``mu``, ``lam``, 1.0 for Nesterov (0.0: heavy ball), and
    ``EXTRAP_ACTIVE`` 0.0 for a segment both ops leave untouched (every buffer)."""
    row = [0.0] * NUM_EXTRAP_HYPER
    row[EXTRAP_LR], row[EXTRAP_GAMMA], row[EXTRAP_MOMENTUM] = lr, extrapolation_lr, momentum
    row[EXTRAP_WEIGHT_DECAY], row[EXTRAP_NESTEROV], row[EXTRAP_ACTIVE] = weight_decay, nesterov, active
    return [float(x) for x in row]


@shared_arg_docs
def extrapolate_(
    params: Operand,
    saved: Operand,
    direction: Operand,
    offsets: torch.Tensor | None,
    hyper: torch.Tensor,
    *,
    zero_direction: bool = False,
    chunks: ChunkTable | None = None,
) -> None:
    """Save the iterate ``w`` and move the parameters to the extrapolated point ``u``, in one pass.

    For every element ``i`` of an active segment ``j``, with ``gamma = hyper[j, EXTRAP_GAMMA]`` and
    ``lam = hyper[j, EXTRAP_WEIGHT_DECAY]`` (inactive segments are left untouched)::

        saved[i]  <- w[i]                                 (a bit-exact copy)
        params[i] <- w[i] - gamma * (d[i] + lam * w[i])   (u = w - gamma * grad of f + lam/2 |w|^2)
        d[i]      <- 0                                    (only with zero_direction)

    Args:
        params: parameters, float32, bfloat16 or float16: ``w`` in, ``u`` out. {operand}
        saved: receives ``w``; ``params``'s dtype, laid out like it (flat or a list).
        direction: ``d`` (float32, bfloat16 or float16), e.g. the mini-batch gradient at ``w``.
        offsets: {offsets}
        hyper: float32 ``[S, NUM_EXTRAP_HYPER]`` per-segment hyper-parameters (columns ``EXTRAP_*``), on
            the device.
        zero_direction: zero ``d`` in the same pass, so that the next backward writes the gradient at ``u``.
        chunks: {chunks}

    Bytes per element (float32): read ``w``, ``d``; write ``saved``, ``u``: 16 (20 with zero_direction).
    """
    named = _operands(params, saved, ("direction", direction, GRAD_DTYPES))
    table = _extrap_table(offsets, named, hyper, chunks)
    ops = [op for _, _, op in named]
    _extrapolate_op(*ops, hyper, *table.op_args(), bool(zero_direction))


@shared_arg_docs
def extrap_step_(
    params: Operand,
    saved: Operand,
    grad: Operand,
    momentum: Operand,
    offsets: torch.Tensor | None,
    hyper: torch.Tensor,
    *,
    extrapolate_next: bool = False,
    chunks: ChunkTable | None = None,
) -> None:
    """The momentum-SGD update from the saved iterate with the gradient taken at the extrapolated point.

    For every element ``i`` of an active segment ``j``, with ``w = saved[i]``, ``g = grad[i]`` (taken at
    ``u``) and the segment's ``eta, mu, lam, gamma`` (columns ``EXTRAP_LR, EXTRAP_MOMENTUM,
    EXTRAP_WEIGHT_DECAY, EXTRAP_GAMMA``; inactive segments are left untouched)::

        g'        = g + lam * w                           (L2 weight decay at the iterate w)
        m[i]     <- mu * m[i] + g'
        w'        = w - eta * (g' + mu * m[i])            (Nesterov; heavy ball: w - eta * m[i])
        params[i] <- w'

    With ``extrapolate_next`` (extrapolation from the past), the same pass continues with
    :func:`extrapolate_` on the new iterate and ``d = g``, exactly as the two calls would::

        saved[i]  <- w'  (rounded to the parameter dtype);   params[i] <- w' - gamma * (g + lam * w')

    Args:
        params: parameters (float32, bfloat16 or float16): ``u`` in (not read), ``w'`` or the next
            ``u`` out. {operand}
        saved: the iterate ``w`` (``params``'s dtype); becomes ``w'`` with ``extrapolate_next``.
        grad: the gradient at ``u`` (float32, bfloat16 or float16).
        momentum: float32 momentum buffer, updated in place.
        offsets: {offsets}
        hyper: float32 ``[S, NUM_EXTRAP_HYPER]`` table, as for :func:`extrapolate_`.
        extrapolate_next: also save ``w'`` and extrapolate from it along ``g``.
        chunks: {chunks}

    Bytes per element (float32): read ``saved``, ``g``, ``m``; write ``params``, ``m``: 20 (24 with
    extrapolate_next, which also writes ``saved``).
    """
    named = _operands(params, saved, ("grad", grad, GRAD_DTYPES), ("momentum", momentum, (torch.float32,)))
    table = _extrap_table(offsets, named, hyper, chunks)
    ops = [op for _, _, op in named]
    _extrap_step_op(*ops, hyper, *table.op_args(), bool(extrapolate_next))


def _operands(params: Operand, saved: Operand, *others: tuple[str, Operand, tuple[torch.dtype, ...]]) -> list:
    """``(name, as given, as_operand(...))`` for ``params``, ``saved`` (``params``'s dtype) and the others;
    flat buffers among them checked for overlap."""
    params_op = as_operand("params", params, GRAD_DTYPES)
    dtype = params_op[0].dtype if params_op else torch.float32
    named = [("params", params, params_op), ("saved", saved, as_operand("saved", saved, (dtype,)))]
    named += [(name, given, as_operand(name, given, dtypes)) for name, given, dtypes in others]
    check_disjoint(*((name, given) for name, given, _ in named))
    return named


def _extrap_table(
    offsets: torch.Tensor | None, named: list, hyper: torch.Tensor, chunks: ChunkTable | None
) -> ChunkTable:
    table = table_for(offsets, named, chunks)
    check_hyper("hyper", hyper, table.num_segments, NUM_EXTRAP_HYPER, table.offsets)
    return table


@fused_op("extrapolate_", mutates_args=("params", "saved", "direction"))
def _extrapolate_op(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    direction: list[torch.Tensor],
    hyper: torch.Tensor,
    table: list[torch.Tensor],
    sizes: list[int],
    zero_direction: bool,
) -> None:
    chunks = ChunkTable.from_op_args(table, sizes)
    backend_module(chunks.offsets.device).extrapolate_(
        params, saved, direction, hyper, chunks, zero_direction
    )


@_extrapolate_op.register_fake
def _(params, saved, direction, hyper, *rest):
    return None


@fused_op("extrap_step_", mutates_args=("params", "saved", "momentum"))
def _extrap_step_op(
    params: list[torch.Tensor],
    saved: list[torch.Tensor],
    grad: list[torch.Tensor],
    momentum: list[torch.Tensor],
    hyper: torch.Tensor,
    table: list[torch.Tensor],
    sizes: list[int],
    extrapolate_next: bool,
) -> None:
    chunks = ChunkTable.from_op_args(table, sizes)
    backend_module(chunks.offsets.device).extrap_step_(
        params, saved, grad, momentum, hyper, chunks, extrapolate_next
    )


@_extrap_step_op.register_fake
def _(params, saved, grad, momentum, hyper, *rest):
    return None
