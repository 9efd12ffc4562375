"""Run the benchmark suite: ``python -m benchmarks.run [--device cuda] [--only accumulate] [--out DIR]``.

Prints one table per benchmark and writes ``<out>/<bench>.csv`` and ``.json`` (environment + rows).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks.common import default_out_dir, device_name, finish, memory_bandwidth, print_table, write

BENCHES = ["accumulate", "extrap", "lamb", "host_overhead"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=BENCHES)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: per device/date)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out_dir = args.out or default_out_dir(device)
    bandwidth = memory_bandwidth(device)
    print(f"device: {device_name(device)}; measured memory bandwidth {bandwidth:.1f} GB/s")
    for name in args.only:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rows = finish(module.run(device, quick=args.quick), bandwidth, module.BASELINE)
        print()
        print_table(rows, module.BASELINE)
        path = write(rows, name, out_dir, device, extra={"bandwidth_gbps": bandwidth})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
