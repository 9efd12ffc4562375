"""FSDP2 with FusedLAMB and a GradientAccumulator: the same loop as one process, on sharded parameters.

Each rank shards the digits MLP with ``fully_shard``, feeds its slice of every global micro-batch, and lets
the accumulator decide when to step (``AnglePolicy``): the angle statistics, the trust ratios and the
clipping norm are summed over the shards, so every rank takes the same steps, those of one process on the
whole micro-batches. The model stays on the CPU here: ``torchrun --nproc-per-node=2
examples/fsdp2_accumulator.py`` runs it with gloo, and so does the command below, which spawns the
processes itself (on GPUs, move the model and batches to each rank's device and NCCL carries the same
collectives)::

    python examples/fsdp2_accumulator.py --world 2 --micro-batches 240

Rank 0 prints the samples of each step and the final validation accuracy.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from dynbatch_kernels import AnglePolicy, GradientAccumulator
from dynbatch_kernels.data import DigitsMLP, load_digits_split
from dynbatch_kernels.optim import FusedLAMB

MICRO = 24  # samples per global micro-batch (each rank takes MICRO / world)


def train(rank: int, world: int, micro_batches: int) -> list[int]:
    """The training loop of one rank; returns the samples of every step."""
    torch.manual_seed(0)
    model = DigitsMLP(width=64, depth=2)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    opt = FusedLAMB(model.parameters(), lr=5e-2, trust_clip=(0.0, 1.0), max_grad_norm=1.0)
    acc = GradientAccumulator(opt, AnglePolicy(max_samples=16 * MICRO, groups="auto"), model=model)
    data = load_digits_split()
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))
    size = MICRO // world
    for k in range(micro_batches):
        start = (k * MICRO) % (len(order) - MICRO) + rank * size
        idx = order[start : start + size]
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        if acc.accumulate(size, loss.detach()):
            acc.step()
    with torch.no_grad():
        accuracy = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
    if rank == 0:
        print(f"steps: {[r.samples for r in acc.history]}; validation accuracy {accuracy:.3f}")
    return [r.samples for r in acc.history]


def spawned(rank: int, world: int, port: int, micro_batches: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, micro_batches)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="gloo processes to spawn (without torchrun)")
    parser.add_argument("--micro-batches", type=int, default=240)
    args = parser.parse_args()
    if MICRO % args.world:
        parser.error(f"--world must divide the micro-batch of {MICRO} samples")
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group()
        try:
            train(dist.get_rank(), dist.get_world_size(), args.micro_batches)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(spawned, args=(args.world, port, args.micro_batches), nprocs=args.world)


if __name__ == "__main__":
    main()
