"""accumulate_ (fused A += s*G with per-segment sums) against the eager reference, torch.compile of it,
and a bare ``acc.add_(grad)``: the same 12 bytes per element with no reductions, the practical floor."""

from __future__ import annotations

import torch

from benchmarks.common import Row, Timed, side_by_side
from benchmarks.layouts import bert_base_shapes, offsets_for
from dynbatch_kernels import ChunkTable, ops, reference
from dynbatch_kernels.backends import backend_name

NAME = "accumulate"
BASELINE = "bare add_"
SEGMENT = 1 << 14  # mean segment length of the synthetic layouts


def cases(quick: bool) -> list[tuple[str, torch.Tensor]]:
    top = 20 if quick else 26
    out = []
    for exp in range(16, top + 1, 2):
        n = 1 << exp
        segments = max(1, n // SEGMENT)
        out.append((f"2^{exp}", torch.linspace(0, n, segments + 1).round().to(torch.int64)))
    if not quick:
        out.append(("bert-base", offsets_for(bert_base_shapes())))
    return out


def run(device: torch.device, quick: bool = False) -> list[Row]:
    compiled = torch.compile(reference.accumulate_.__wrapped__)  # the flat-buffer implementation
    return [r for case, offsets in cases(quick) for r in bench_case(case, offsets, device, compiled)]


def bench_case(case: str, offsets: torch.Tensor, device: torch.device, compiled) -> list[Row]:
    table = ChunkTable.from_offsets(offsets, device=device)
    n = table.num_elements
    acc = torch.randn(n, device=device) * 1e-3
    grad = torch.randn(n, device=device) * 1e-3
    zeroed = grad.clone()  # the zero_grad variant's input, refilled (untimed) before each call
    pieces = [grad[lo:hi].clone() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    fused = f"dynbatch ({backend_name(device)})"
    timed = [
        Timed(BASELINE, lambda: acc.add_(grad), 12 * n),
        Timed(fused, lambda: ops.accumulate_(acc, grad, table.offsets, chunks=table), 12 * n),
        Timed(
            fused + " plain call", lambda: ops.accumulate_(acc, grad, table.offsets), 12 * n, "cached table"
        ),
        Timed(
            fused + " scattered grads",
            lambda: ops.accumulate_(acc, pieces, table.offsets, chunks=table),
            12 * n,
            "one tensor per segment",
        ),
        Timed(
            fused + " zero_grad",
            lambda: ops.accumulate_(acc, zeroed, table.offsets, chunks=table, zero_grad=True),
            16 * n,
            "16 B/element",
            setup=lambda: zeroed.copy_(grad),
        ),
        Timed("reference eager", lambda: reference.accumulate_(acc, grad, table, 1.0, False), 12 * n),
        Timed("reference compiled", lambda: compiled(acc, grad, table, 1.0, False), 12 * n),
    ]
    return side_by_side(NAME, case, timed, device, reps=5 if n >= 1 << 24 else 20)
