"""Communication of data-parallel training with and without the accumulator, counted, not estimated.

``R`` gloo ranks on the CPU train a digits MLP (width 64, depth 2: 21,450 float32 parameters, 85.8 KB of
gradient) on micro-batches of ``b`` samples per rank, ``K`` micro-batches a step:

- ``plain DDP``: DDP's all-reduce on every backward, an optimizer step per micro-batch (batch ``R b``);
- ``DDP, fixed accumulation``: ``no_sync()`` on all micro-batches but the last of a step;
- ``accumulator, local`` / ``accumulator, exact``: ``GradientAccumulator(..., model=ddp,
  ddp_sync=...)`` with ``FixedPolicy(R K b)``.

Every all-reduce is counted by wrapping ``torch.distributed.all_reduce``: the accumulator calls it for each
of its collectives, and DDP's buckets go through it by a comm hook (``register_comm_hook`` with torch's
default ``allreduce_hook``, which calls it). ``python -m benchmarks.bench_ddp_comm [--world 2] [--micro
16] [--steps-of 4]`` prints rank 0's bytes per step, per sample and all-reduces per micro-batch.
"""

import argparse
import contextlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from dynbatch_kernels.batching import FixedPolicy, GradientAccumulator
from dynbatch_kernels.data import DigitsMLP, load_digits_split

STEPS = 3
PROVIDERS = ("plain DDP", "DDP, fixed accumulation", "accumulator, local", "accumulator, exact")


class Counter:
    """Bytes and calls of all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1


def python_hook(state: None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's default reduction, through ``torch.distributed.all_reduce`` (where it is counted)."""
    return allreduce_hook(state, bucket)


@contextlib.contextmanager
def counting_all_reduce(counter: Counter):
    """Count every ``torch.distributed.all_reduce`` made while inside."""
    original = dist.all_reduce

    def wrapped(tensor, *args, **kwargs):
        counter.add(tensor)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = wrapped
    try:
        yield
    finally:
        dist.all_reduce = original


def run(provider: str, rank: int, world: int, micro: int, per_step: int) -> Counter:
    """Train ``STEPS`` steps of ``per_step`` micro-batches (plain DDP: one step per micro-batch)."""
    data = load_digits_split()
    model = DigitsMLP(width=64, depth=2)
    ddp = DistributedDataParallel(model)
    counter = Counter()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = None
    if provider.startswith("accumulator"):
        mode = provider.split(", ")[1]
        acc = GradientAccumulator(opt, FixedPolicy(world * per_step * micro), model=ddp, ddp_sync=mode)
    else:
        ddp.register_comm_hook(None, python_hook)
    with counting_all_reduce(counter):
        for k in range(STEPS * per_step):
            start = (k * world + rank) * micro
            xb, yb = data.x_train[start : start + micro], data.y_train[start : start + micro]
            last = provider == "plain DDP" or k % per_step == per_step - 1
            with contextlib.nullcontext() if acc is not None or last else ddp.no_sync():
                loss = nn.functional.cross_entropy(ddp(xb), yb)
                loss.backward()
            if acc is not None:
                if acc.accumulate(micro, loss.detach()):
                    acc.step()
            elif last:
                opt.step()
                opt.zero_grad()
    return counter


def worker(rank: int, world: int, port: int, micro: int, per_step: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for provider in PROVIDERS:
        counter = run(provider, rank, world, micro, per_step)
        micro_batches = STEPS * per_step
        steps = micro_batches if provider == "plain DDP" else STEPS
        rows.append(
            (
                provider,
                counter.bytes / steps,
                counter.bytes / (micro_batches * world * micro),
                counter.calls / micro_batches,
            )
        )
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--micro", type=int, default=16, help="samples per rank and micro-batch")
    parser.add_argument("--steps-of", type=int, default=4, help="micro-batches per step (accumulation)")
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=worker, args=(r, args.world, port, args.micro, args.steps_of, queue))
        for r in range(args.world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"ranks failed: exit codes {[proc.exitcode for proc in procs]}")
    rows = queue.get(timeout=10)
    print(f"R={args.world} ranks, b={args.micro} samples per rank and micro-batch, K={args.steps_of}")
    print(f"{'provider':<26} {'bytes/step':>12} {'bytes/sample':>13} {'all-reduces/micro-batch':>24}")
    for provider, per_step, per_sample, calls in rows:
        print(f"{provider:<26} {per_step:>12,.0f} {per_sample:>13,.1f} {calls:>24.2f}")


if __name__ == "__main__":
    main()
