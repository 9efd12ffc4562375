"""Host overhead of the accumulator in CPU instructions: :mod:`benchmarks.bench_host_overhead`'s loops under
valgrind's callgrind, which counts every instruction the process executes. Unlike the times, the counts do
not move with a shared machine's load, so two versions of the code can be compared run against run.

``python -m benchmarks.bench_host_instructions`` compiles a small helper (``valgrind/callgrind.h`` client
requests: start and stop counting, dump the counts), runs the providers under callgrind once warm (one
thread, :data:`~benchmarks.bench_host_overhead.MICRO_BATCHES` micro-batches each; a few minutes, most of
them importing torch under valgrind) and prints instructions per micro-batch and their excess over the
plain loop. Needs ``valgrind`` with its headers and a C compiler; says so and exits otherwise. Instructions
are not time (a cache miss costs hundreds of cycles and counts once): this is the host work, not its
latency.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HELPER = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void zero(void) { CALLGRIND_ZERO_STATS; }
void dump(const char* name) { CALLGRIND_DUMP_STATS_AT(name); }
"""
WARM_ROUNDS = 3


def child(helper: str) -> None:
    """Under callgrind: warm every provider up uncounted, then count each one's loop in its own dump."""
    import torch

    from benchmarks.bench_host_overhead import providers

    torch.set_num_threads(1)
    counter = ctypes.CDLL(helper)
    loops = providers(torch.device("cpu"))
    for _ in range(WARM_ROUNDS):
        for _, loop in loops:
            loop()
    for name, loop in loops:
        counter.start()
        counter.zero()
        loop()
        counter.dump(name.encode())
        counter.stop()


def counts(out_dir: Path) -> dict[str, int]:
    """``{provider: instructions}`` from callgrind's dumps (one per provider, named by the trigger)."""
    found = {}
    for dump in sorted(out_dir.glob("callgrind.out.*")):
        text = dump.read_text(errors="replace")
        trigger = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        summary = re.search(r"^summary: (\d+)$", text, re.M)
        if trigger and summary:
            found[trigger.group(1)] = int(summary.group(1))
    return found


def main() -> None:
    from benchmarks.bench_host_overhead import BASELINE, MICRO_BATCHES

    compiler = shutil.which("cc") or shutil.which("gcc")
    header = Path("/usr/include/valgrind/callgrind.h")
    if shutil.which("valgrind") is None or compiler is None or not header.exists():
        print("bench_host_instructions: needs valgrind (with valgrind/callgrind.h) and a C compiler; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        (out_dir / "helper.c").write_text(HELPER)
        helper = out_dir / "helper.so"
        subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", helper, out_dir / "helper.c"], check=True)
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_dir / 'callgrind.out'}",
            sys.executable,
            "-m",
            "benchmarks.bench_host_instructions",
            "--child",
            str(helper),
        ]
        subprocess.run(command, check=True, capture_output=True)
        found = counts(out_dir)
    base = found[BASELINE] / MICRO_BATCHES
    print(f"{'instructions per micro-batch':<30} {'count':>10} {'over plain':>11}")
    for name, total in found.items():
        print(f"{name:<30} {total / MICRO_BATCHES:>10.0f} {total / MICRO_BATCHES - base:>+11.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
