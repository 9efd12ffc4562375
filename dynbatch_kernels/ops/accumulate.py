"""``accumulate_``: fused gradient accumulation with the per-segment angle and variance sums."""

from __future__ import annotations

import torch

from dynbatch_kernels.backends import backend_module
from dynbatch_kernels.checks import GRAD_DTYPES, check_flat, check_same, chunk_table_for
from dynbatch_kernels.chunks import ChunkTable
from dynbatch_kernels.columns import NUM_ACC_SUMS
from dynbatch_kernels.ops.argdoc import shared_arg_docs
from dynbatch_kernels.ops.registry import fused_op


@shared_arg_docs
def accumulate_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float = 1.0,
    zero_grad: bool = False,
    chunks: ChunkTable | None = None,
) -> torch.Tensor:
    """Fused gradient accumulation with the per-segment angle and variance sums, in one pass.

    With ``s = scale``, for every element ``i`` and segment ``j = [offsets[j], offsets[j+1])``::

        acc[i] <- acc[i] + s*grad[i]                 (in place; grad[i] <- 0 if zero_grad)
        out[j] = [sum acc_old*s*g, sum (s*g)^2, sum acc_old^2, sum acc_new^2]

    Args:
        acc: float32 flat accumulator, updated in place.
        grad: flat gradient, float32, bfloat16 or float16, as long as ``acc`` on the same device.
        offsets: {offsets}
        scale: multiplies ``grad`` (e.g. a micro-batch size, or ``1/loss_scale``).
        zero_grad: zero ``grad`` in the same pass (16 bytes/element instead of 12 for float32).
        chunks: {chunks}

    Returns:
        float32 ``[S, 4]``: columns ``ACC_DOT, GRAD_SQ, ACC_OLD_SQ, ACC_NEW_SQ``. A non-finite gradient
        element shows up as a non-finite ``GRAD_SQ`` for its segment: the overflow signal, no exception.
    """
    check_flat("acc", acc, (torch.float32,))
    check_flat("grad", grad, GRAD_DTYPES)
    check_same("grad", grad, "acc", acc)
    table = chunk_table_for(offsets, acc, chunks)
    return _accumulate_op(acc, grad, *table.op_args(), float(scale), bool(zero_grad))


@fused_op("accumulate_", mutates_args=("acc", "grad"))
def _accumulate_op(
    acc: torch.Tensor,
    grad: torch.Tensor,
    offsets: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    segment_chunks: torch.Tensor,
    chunk_segments: torch.Tensor,
    chunk_size: int,
    aligned: bool,
    scale: float,
    zero_grad: bool,
) -> torch.Tensor:
    table = ChunkTable.from_op_args(
        acc.numel(), offsets, starts, ends, segment_chunks, chunk_segments, chunk_size, aligned
    )
    return backend_module(acc.device).accumulate_(acc, grad, table, scale, zero_grad)


@_accumulate_op.register_fake
def _(acc, grad, offsets, *rest):
    return acc.new_empty(offsets.shape[0] - 1, NUM_ACC_SUMS)
