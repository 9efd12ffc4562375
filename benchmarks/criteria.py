"""The ratios the kernel issues ask for, timed side by side in rounds: ``python -m benchmarks.criteria``.

Per round, every provider once, in turn (so a slow phase of the machine hits all of them); medians over
rounds. Prints, for 2^24 elements and the BERT-base layout, the plain ``accumulate_`` call (no
``chunks=``) and its scattered-gradient form against a bare ``acc.add_(grad)``; for BERT-base and 2,000
small tensors, FusedLAMB on a bound layout (flat), FusedLAMB reading separate tensors in place
(scattered) and ``AdamW(fused=True)``; for BERT-base, ``lamb_step_`` on separate tensors with ``u`` kept in
a private ``update=`` buffer (as FusedLAMB does) against ``u`` written over the gradients: the cost of the
write-allocate reads of the separate buffer on a CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.layouts import bert_base_shapes, many_small_shapes, offsets_for
from dynbatch_kernels import ChunkTable, FlatLayout, ops
from dynbatch_kernels.optim import FusedLAMB

ROUNDS = 25


def rounds(providers: dict[str, Callable[[], object]], count: int = ROUNDS) -> dict[str, float]:
    """Median milliseconds per provider over ``count`` interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    for r in range(count + 1):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def accumulate_case(offsets: torch.Tensor) -> dict[str, float]:
    n = int(offsets[-1])
    acc, grad = torch.randn(n) * 1e-3, torch.randn(n) * 1e-3
    pieces = [grad[lo:hi].clone() for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    return rounds(
        {
            "bare add_": lambda: acc.add_(grad),
            "plain call": lambda: ops.accumulate_(acc, grad, offsets),
            "scattered grads": lambda: ops.accumulate_(acc, pieces, offsets),
        }
    )


def lamb_case(shapes: list[tuple[int, ...]]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)

    def params() -> list[torch.nn.Parameter]:
        out = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in out:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return out

    flat, scattered, peer = params(), params(), params()
    return rounds(
        {
            "AdamW(fused)": torch.optim.AdamW(peer, lr=1e-3, weight_decay=0.01, fused=True).step,
            "FusedLAMB flat": FusedLAMB(flat, lr=1e-3, trust_clip=(0.0, 1.0), layout=FlatLayout(flat)).step,
            "FusedLAMB scattered": FusedLAMB(scattered, lr=1e-3, trust_clip=(0.0, 1.0)).step,
        }
    )


def update_buffer_case(shapes: list[tuple[int, ...]]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    sizes = [p.numel() for p in params]
    offsets = torch.tensor([0, *(-(-n // 16) * 16 for n in sizes)]).cumsum(0)
    table = ChunkTable.from_offsets(offsets, lengths=sizes)
    n, segments = int(offsets[-1]), len(sizes)
    m, v, update = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    hyper = torch.tensor([ops.lamb_hyper_row(lr=1e-3, trust_clip=(0.0, 1.0))] * segments)
    step = torch.zeros(segments)

    def call(target: torch.Tensor | None) -> Callable[[], object]:
        return lambda: ops.lamb_step_(
            params, grads, m, v, offsets, hyper=hyper, step=step, update=target, chunks=table
        )

    return rounds({"separate update": call(update), "u over the gradients": call(None)})


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ROUNDS} rounds, medians in ms")
    for name, offsets in (
        ("2^24", torch.tensor([0, 1 << 24])),
        ("bert-base", offsets_for(bert_base_shapes())),
    ):
        t = accumulate_case(offsets)
        print(f"accumulate {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        print(
            f"  plain / bare {t['plain call'] / t['bare add_']:.3f}, scattered / bare "
            f"{t['scattered grads'] / t['bare add_']:.3f}"
        )
    for name, shapes in (("bert-base", bert_base_shapes()), ("2000-small", many_small_shapes())):
        t = lamb_case(shapes)
        print(f"lamb {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        print(
            f"  scattered / flat {t['FusedLAMB scattered'] / t['FusedLAMB flat']:.3f}; AdamW / flat "
            f"{t['AdamW(fused)'] / t['FusedLAMB flat']:.3f}, AdamW / scattered "
            f"{t['AdamW(fused)'] / t['FusedLAMB scattered']:.3f}"
        )
    t = update_buffer_case(bert_base_shapes())
    print("lamb_step_ bert-base: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    print(f"  separate / over the gradients {t['separate update'] / t['u over the gradients']:.3f}")


if __name__ == "__main__":
    main()
