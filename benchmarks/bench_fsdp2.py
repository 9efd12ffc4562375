"""Optimizer step time under FSDP2 (``fully_shard``) on gloo CPU ranks: FusedLAMB against torch's AdamW and
timm's Lamb on the same sharded model, and the bytes of FusedLAMB's norm all-reduce.

``R`` ranks (one thread each) shard an MLP of ``depth`` square ``width`` layers (weights and biases).
Every optimizer gets its own copy of the sharded model and one backward's gradients; then, in ``rounds``
interleaved rounds, each times ``steps`` consecutive ``step()`` calls (the gradients stay; the
parameters move). Rank 0 prints the median time per step of each and its ratio to AdamW, and the bytes
FusedLAMB all-reduces per step (counted by wrapping ``torch.distributed.all_reduce``): the ``[S, 3]``
partial norms, plus one float for ``max_grad_norm``.

``python -m benchmarks.bench_fsdp2 [--world 2] [--width 1024] [--depth 8] [--rounds 15] [--steps 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.bench_ddp_comm import Counter, counting_all_reduce
from benchmarks.peers import timm_lamb
from dynbatch_kernels.optim import FusedLAMB

LAMB = {"lr": 1e-3, "weight_decay": 0.01, "trust_clip": (0.0, 1.0), "max_grad_norm": 1.0}


def providers() -> dict[str, object]:
    """Name -> optimizer factory; timm's Lamb when timm is installed."""
    out = {
        "FusedLAMB": lambda ps: FusedLAMB(ps, **LAMB),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    }
    with contextlib.suppress(ImportError):
        lamb = timm_lamb()
        out["timm Lamb"] = lambda ps: lamb(ps, lr=1e-3, weight_decay=0.01, trust_clip=True, max_grad_norm=1.0)
    return out


def sharded_mlp(width: int, depth: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
    for layer in net:
        fully_shard(layer)
    return fully_shard(net)


def run(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        setups = {}
        for name, make in providers().items():
            net = sharded_mlp(args.width, args.depth)
            net(torch.randn(8, args.width)).square().mean().backward()
            setups[name] = make(net.parameters())
        for opt in setups.values():  # first steps build state (and FusedLAMB's layout)
            opt.step()
        times: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.rounds):
            for name, opt in setups.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                times[name].append((time.perf_counter() - start) / args.steps)
        counter = Counter()
        with counting_all_reduce(counter):
            setups["FusedLAMB"].step()
        if rank == 0:
            report(setups, times, counter, world, args)
    finally:
        dist.destroy_process_group()


def report(setups: dict, times: dict[str, list[float]], counter: Counter, world: int, args) -> None:
    params = sum(p.numel() for p in setups["FusedLAMB"].param_groups[0]["params"])
    segments = len(setups["FusedLAMB"].param_groups[0]["params"])
    base = statistics.median(times["torch AdamW"])
    print(
        f"FSDP2 on {world} gloo CPU ranks (1 thread each), MLP {args.depth} x Linear({args.width}, "
        f"{args.width}): {params:,} parameters in {segments} tensors; median of {args.rounds} interleaved "
        f"rounds of {args.steps} steps"
    )
    print(f"torch {torch.__version__}")
    print("| optimizer | ms per step (rank 0) | / torch AdamW |")
    print("| --- | --- | --- |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.2f} | {median / base:.2f} |")
    print(
        f"FusedLAMB all-reduces per step: {counter.bytes} bytes in {counter.calls} calls "
        f"(12 bytes per tensor for the [S, 3] norms + 4 for the clipping norm: {12 * segments + 4})"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    mp.spawn(run, args=(args.world, free_port(), args), nprocs=args.world)


if __name__ == "__main__":
    main()
