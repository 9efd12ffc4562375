"""The ratios the kernel issues ask for, timed side by side in rounds: ``python -m benchmarks.criteria``.

Per round, every provider once, in turn (so a slow phase of the machine hits all of them). Times are
medians over rounds; each ratio is the median of its per-round ratios (paired: a slow phase slows both
sides of a round alike), with the quartiles of those ratios in brackets. Prints, for 2^24 elements and
the BERT-base layout, the plain ``accumulate_`` call (no ``chunks=``) and its scattered-gradient form
against a bare ``acc.add_(grad)``; for BERT-base and 2,000 small tensors, FusedLAMB on a bound layout
(flat), FusedLAMB reading separate tensors in place (scattered) and ``AdamW(fused=True)``; for
BERT-base, ``lamb_step_`` on separate tensors with ``u`` kept in a private ``update=`` buffer (as
FusedLAMB does) against ``u`` written over the gradients: the cost of the write-allocate reads of the
separate buffer on a CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import device_name
from benchmarks.layouts import bert_base_shapes, many_small_shapes, offsets_for
from dynbatch_kernels import ChunkTable, FlatLayout, ops
from dynbatch_kernels.optim import FusedLAMB

ROUNDS = 25


class Timings(dict):
    """Milliseconds per provider, one entry per round: ``t[name]`` is the median, :meth:`ratio` paired."""

    def __init__(self, per_round: dict[str, list[float]]):
        super().__init__((name, statistics.median(ts)) for name, ts in per_round.items())
        self.per_round = per_round

    def ratio(self, num: str, den: str) -> str:
        """``num / den``: the median of the per-round ratios, and their quartiles."""
        ratios = [a / b for a, b in zip(self.per_round[num], self.per_round[den])]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        return f"{median:.3f} [{q1:.3f}-{q3:.3f}]"


def rounds(providers: dict[str, Callable[[], object]], count: int = ROUNDS) -> Timings:
    """Milliseconds per provider over ``count`` interleaved rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    for r in range(count + 1):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return Timings(times)


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
    print(
        f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, {ROUNDS} rounds, medians in ms; "
        "ratios: median of the per-round ratios [quartiles]"
    )
    for name, offsets in (
        ("2^24", torch.tensor([0, 1 << 24])),
        ("bert-base", offsets_for(bert_base_shapes())),
    ):
        t = accumulate_case(offsets)
        print(f"accumulate {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        print(
            f"  plain / bare {t.ratio('plain call', 'bare add_')}, scattered / bare "
            f"{t.ratio('scattered grads', 'bare add_')}"
        )
    for name, shapes in (("bert-base", bert_base_shapes()), ("2000-small", many_small_shapes())):
        t = lamb_case(shapes)
        print(f"lamb {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
        print(
            f"  scattered / flat {t.ratio('FusedLAMB scattered', 'FusedLAMB flat')}; AdamW / flat "
            f"{t.ratio('AdamW(fused)', 'FusedLAMB flat')}, AdamW / scattered "
            f"{t.ratio('AdamW(fused)', 'FusedLAMB scattered')}"
        )
    t = update_buffer_case(bert_base_shapes())
    print("lamb_step_ bert-base: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    print(f"  separate / over the gradients {t.ratio('separate update', 'u over the gradients')}")


if __name__ == "__main__":
    main()
