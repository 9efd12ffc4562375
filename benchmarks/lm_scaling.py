"""A simulation, not a measurement: optimizer steps and all-reduce volume of a batch trajectory at scale.

Model [McCandlish et al. 2018, "An empirical model of large-batch training"]: a step of ``B`` samples at
gradient noise scale ``B_noise`` makes ``B / (B + B_noise)`` of the progress of an ideal (infinite-batch)
step. A measured run gives, per applied step, its batch ``B_k`` and the accumulator's noise-scale estimate,
hence its progress ``P_k`` and the functions ``B(P)`` and ``B_noise(P)``. With ``W`` data-parallel workers
each computing at least ``micro`` samples per micro-batch round, a global batch is rounded up to a multiple
of ``W * micro``. Both the policy's trajectory ``B(P)`` and a fixed batch are replayed (rounded so) against
the same ``B_noise(P)`` until the run's final progress. All-reduce volume per worker, ring all-reduce of
float32 (``2 (W - 1) / W`` times the payload), as the accumulator does under DDP with
``ddp_sync="local"``: one reduction of the gradient (``4 * params`` bytes) per step and one of the
per-segment sums, counts and loss (``4 * (4 * segments + 3)`` bytes) per micro-batch round.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

WORKERS = (8, 64, 512)


@dataclass(frozen=True)
class Replay:
    """What a batch schedule takes to reach a given progress: steps, samples, rounds, all-reduce bytes."""

    steps: int
    samples: int
    rounds: int
    allreduce_bytes: float


def progress(trajectory: list[tuple[int, float]]) -> tuple[list[float], list[int], list[float]]:
    """Per applied step ``(B_k, B_noise_k)`` -> progress after each step, ``B_k``, the filled ``B_noise_k``.

    Steps without an estimate (NaN, before the first one) take the nearest one; with no estimate at all
    the noise scale is taken as 0 (every step an ideal step).
    """
    known = [n for _, n in trajectory if math.isfinite(n) and n > 0]
    last = known[0] if known else 0.0
    done, marks, batches, noise = 0.0, [], [], []
    for batch, estimate in trajectory:
        last = estimate if math.isfinite(estimate) and estimate > 0 else last
        done += batch / (batch + last)
        marks.append(done)
        batches.append(batch)
        noise.append(last)
    return marks, batches, noise


def replay(
    trajectory: list[tuple[int, float]],
    workers: int,
    params: int,
    segments: int,
    micro: int = 1,
    fixed: int | None = None,
) -> Replay:
    """Replay ``trajectory`` (or the ``fixed`` batch against its noise scales) on ``workers`` workers."""
    marks, batches, noise = progress(trajectory)
    unit = workers * micro
    ring = 2 * (workers - 1) / workers
    done, steps, samples, rounds = 0.0, 0, 0, 0
    while done < marks[-1] * (1 - 1e-9):
        k = min(bisect.bisect_right(marks, done), len(marks) - 1)
        batch = unit * math.ceil((fixed or batches[k]) / unit)
        done += batch / (batch + noise[k])
        steps, samples, rounds = steps + 1, samples + batch, rounds + batch // unit
    volume = ring * (steps * 4 * params + rounds * 4 * (4 * segments + 3))
    return Replay(steps, samples, rounds, volume)
