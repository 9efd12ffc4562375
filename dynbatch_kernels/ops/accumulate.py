"""``accumulate_``: fused gradient accumulation with the per-segment angle and variance sums."""

from __future__ import annotations

import torch

from dynbatch_kernels.backends import backend_module
from dynbatch_kernels.checks import GRAD_DTYPES, Operand, as_operand, check_disjoint, table_for
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.columns import NUM_ACC_SUMS
from dynbatch_kernels.ops.argdoc import shared_arg_docs
from dynbatch_kernels.ops.registry import fused_op


@shared_arg_docs
def accumulate_(
    acc: Operand,
    grad: Operand,
    offsets: torch.Tensor | None,
    *,
    scale: float = 1.0,
    zero_grad: bool = False,
    chunks: ChunkTable | None = None,
    out: Operand | None = None,
) -> torch.Tensor:
    """Fused gradient accumulation with the per-segment angle and variance sums, in one pass.

    With ``s = scale``, for every element ``i`` and segment ``j``::

        acc_new[i] = acc[i] + s*grad[i]              (into acc, or into out; grad[i] <- 0 if zero_grad)
        sums[j] = [sum acc*s*g, sum (s*g)^2, sum acc^2, sum acc_new^2]

    Args:
        acc: float32 accumulator, updated in place (only read when ``out`` is given). {operand}
        grad: the gradient, float32, bfloat16 or float16, laid out like ``acc``. {operand}
        offsets: {offsets}
        scale: multiplies ``grad`` (e.g. a micro-batch size, or ``1/loss_scale``).
        zero_grad: zero ``grad`` in the same pass (16 bytes/element instead of 12 for float32).
        chunks: {chunks}
        out: float32, laid out like ``acc`` and disjoint from it and from ``grad``: receives ``acc_new``
            while ``acc`` keeps its values (the same bytes as in place), so that the caller can keep or
            drop the result without a backup copy of ``acc``; padding between segments is not written.
            None (or ``acc`` itself): in place.

    Returns:
        float32 ``[S, 4]``: columns ``ACC_DOT, GRAD_SQ, ACC_OLD_SQ, ACC_NEW_SQ``. A non-finite gradient
        element shows up as a non-finite ``GRAD_SQ`` for its segment: the overflow signal, no exception.
    """
    acc_op = as_operand("acc", acc, (torch.float32,))
    grad_op = as_operand("grad", grad, GRAD_DTYPES)
    named = [("acc", acc, acc_op), ("grad", grad, grad_op)]
    out_op: list[torch.Tensor] = []
    if out is not None and out is not acc:
        if isinstance(out, (list, tuple)) and not out:
            raise ValueError("out: expected a flat buffer or one tensor per segment, got an empty list")
        out_op = as_operand("out", out, (torch.float32,))
        named.append(("out", out, out_op))
    check_disjoint(*((name, value) for name, value, _ in named))
    table = table_for(offsets, named, chunks)
    return _accumulate_op(acc_op, grad_op, out_op, *table.op_args(), float(scale), bool(zero_grad))


@fused_op("accumulate_", mutates_args=("acc", "grad", "out"))
def _accumulate_op(
    acc: list[torch.Tensor],
    grad: list[torch.Tensor],
    out: list[torch.Tensor],
    table: list[torch.Tensor],
    sizes: list[int],
    scale: float,
    zero_grad: bool,
) -> torch.Tensor:
    """``out`` is an empty list for in place (a custom op has no optional tensor lists)."""
    chunks = ChunkTable.from_op_args(table, sizes)
    kernels = backend_module(chunks.offsets.device)
    return kernels.accumulate_(acc, grad, chunks, scale, zero_grad, out or None)


@_accumulate_op.register_fake
def _(acc, grad, out, table, sizes, *rest):
    return table[0].new_empty(table[0].shape[0] - 1, NUM_ACC_SUMS, dtype=torch.float32)
