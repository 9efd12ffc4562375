"""Run many distributed test cases in one set of gloo processes (spawning costs seconds per process group).

:func:`run_cases` starts ``world_size`` spawned processes once; each joins one gloo process group on a free
loopback port, runs every case in order (``case(rank, world_size) -> result``, all ranks the same list) and
saves ``{case name: result}`` to ``<folder>/rank<r>.pt``. A failing case is recorded with its traceback
(``{"error": ...}``) and the ranks meet at a barrier before the next case; a case that leaves a rank
behind in a collective fails all ranks after the group's ``timeout``, never hangs the suite. A rank that
saved its results leaves through ``os._exit(0)``, skipping the interpreter's teardown: there gloo's
threads once aborted a rank of a 3-rank FSDP2 run ("terminate called without an active exception", exit
code -6) in a fresh-clone CI run.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Case = Callable[[int, int], object]

#: How long a collective waits for a missing rank before the process group fails it.
GROUP_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bound by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cases(cases: list[Case], world_size: int, folder: Path, timeout_s: float = 240.0) -> list[dict]:
    """Run ``cases`` on ``world_size`` gloo ranks; return each rank's ``{case name: result}``."""
    context = mp.get_context("spawn")
    port = free_port()
    procs = [
        context.Process(target=_worker, args=(r, world_size, port, cases, folder)) for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    if any(codes):
        saved = [r for r in range(world_size) if (folder / f"rank{r}.pt").exists()]
        raise RuntimeError(
            f"distributed workers: expected exit codes 0, got {codes} (ranks that saved results: {saved})"
        )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _worker(rank: int, world_size: int, port: int, cases: list[Case], folder: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)
    results: dict[str, object] = {}
    try:
        for case in cases:
            try:
                results[case.__name__] = case(rank, world_size)
            except Exception:
                results[case.__name__] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, folder / f"rank{rank}.pt")
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # saved: no interpreter teardown (see the module docstring)


def result(results: list[dict], name: str) -> list:
    """Every rank's result of case ``name``; fails with the rank's traceback when the case raised."""
    values = [r[name] for r in results]
    for rank, value in enumerate(values):
        if isinstance(value, dict) and "error" in value:
            raise AssertionError(f"case {name} failed on rank {rank}:\n{value['error']}")
    return values
