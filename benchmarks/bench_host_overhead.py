"""Host overhead of :class:`~dynbatch_kernels.batching.GradientAccumulator` per micro-batch, on a model so
small that the Python around the kernels is what is measured: an MLP 32 -> 64 -> 10, micro-batches of 16,
steps of 64 samples (4 micro-batches), ``AdamW(fused=True)``, one thread.

Providers, each timed as microseconds per micro-batch (a run of :data:`MICRO_BATCHES` of them):

- ``forward+backward``: the model alone, no optimizer;
- ``plain loop``: torch's accumulation loop (``(loss / 4).backward()``, ``step()`` and ``zero_grad()``
  every 4th micro-batch), the baseline;
- ``accumulator``: ``loss.backward(); if acc.accumulate(16, loss.detach()): acc.step()`` under
  ``FixedPolicy(64)``: ``p.grad`` stay views into the accumulator's buffer (the fast path);
- ``accumulator, grads None``: the same with ``model.zero_grad()`` (``set_to_none=True``) before every
  backward, so every gradient is a fresh tensor the accumulator copies in.

Times are the CPU time of the training thread (``time.thread_time``: time the thread is descheduled on a
shared machine does not count; on CUDA, wall time up to a device sync), providers run round-robin.
``python -m benchmarks.bench_host_overhead`` prints the table, each provider's excess over the plain loop
both as the difference of the medians and as the median of the per-round differences (with their
quartiles): a round's providers run back to back, so its differences cancel most of a shared machine's
load, which comes and goes over many rounds. ``python -m benchmarks.run --only host_overhead`` writes the
table with the other benchmarks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import Row, quantiles, sync
from dynbatch_kernels.batching import FixedPolicy, GradientAccumulator

NAME = "host_overhead"
BASELINE = "plain loop"
MICRO_BATCHES = 64  # per timed call: 16 optimizer steps
MICRO, STEP = 16, 64


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)


def run(device: torch.device, quick: bool = False) -> list[Row]:
    """One row per provider; ``p20_ms``, ``p50_ms``, ``p80_ms`` are milliseconds per micro-batch."""
    case = f"mlp-32-64-10 b{MICRO}"
    return [Row(NAME, case, name, *quantiles(slot), 0) for name, slot in timings(device, quick).items()]


def timings(device: torch.device, quick: bool = False) -> dict[str, list[float]]:
    """``{provider: milliseconds per micro-batch in each round}``, on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timings(device, reps=10 if quick else 40)
    finally:
        torch.set_num_threads(previous)


def providers(device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    """``(name, loop)`` per provider: each loop runs :data:`MICRO_BATCHES` micro-batches."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(MICRO, 32, generator=gen).to(device),
            torch.randint(0, 10, (MICRO,), generator=gen).to(device),
        )
        for _ in range(MICRO_BATCHES)
    ]
    loss_fn = nn.functional.cross_entropy
    per_step = STEP // MICRO

    bare = make_model(device)

    def forward_backward() -> None:
        for x, y in batches:
            loss_fn(bare(x), y).backward()

    plain = make_model(device)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, fused=True)

    def plain_loop() -> None:
        for k, (x, y) in enumerate(batches, start=1):
            (loss_fn(plain(x), y) / per_step).backward()
            if k % per_step == 0:
                plain_opt.step()
                plain_opt.zero_grad()

    def accumulator_loop(set_to_none: bool) -> Callable[[], None]:
        model = make_model(device)
        acc = GradientAccumulator(
            torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), FixedPolicy(STEP), history_size=16
        )

        def loop() -> None:
            for x, y in batches:
                if set_to_none:
                    model.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                if acc.accumulate(MICRO, loss.detach()):
                    acc.step()

        return loop

    return [
        ("forward+backward", forward_backward),
        (BASELINE, plain_loop),
        ("accumulator", accumulator_loop(False)),
        ("accumulator, grads None", accumulator_loop(True)),
    ]


def _timings(device: torch.device, reps: int) -> dict[str, list[float]]:
    timed = providers(device)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    times: list[list[float]] = [[] for _ in timed]
    for rep in range(-5, reps):  # 5 warm-up rounds
        for slot, (_, fn) in zip(times, timed):
            sync(device)
            start = clock()
            fn()
            sync(device)
            if rep >= 0:
                slot.append((clock() - start) * 1e3 / MICRO_BATCHES)
    return {name: slot for slot, (name, _) in zip(times, timed)}


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times = timings(device)
    base = times[BASELINE]
    print(
        f"{'us per micro-batch':<26} {'p20':>8} {'p50':>8} {'p80':>8} {'over plain':>11}   "
        "per-round excess: median [quartiles]"
    )
    for name, slot in times.items():
        p20, p50, p80 = (1e3 * q for q in quantiles(slot))
        diffs = statistics.quantiles([1e3 * (t - b) for t, b in zip(slot, base)], n=4, method="inclusive")
        print(
            f"{name:<26} {p20:>8.1f} {p50:>8.1f} {p80:>8.1f} {p50 - 1e3 * statistics.median(base):>+11.1f}   "
            f"{diffs[1]:+.1f} [{diffs[0]:+.1f}, {diffs[2]:+.1f}]"
        )


if __name__ == "__main__":
    main()
