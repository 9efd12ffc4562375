"""Samples, steps and train seconds to a validation loss, read from a finished LM experiment's curves.

``python -m benchmarks.lm_read_curves [--bpb 3.0] [--comparison policies] [--curves PATH]``: for each
method of the comparison, the mean over the seeds that reached ``--bpb`` bits/byte of the first evaluation
at or below it (the curves of ``benchmarks/results/lm_curves.csv`` are evaluated every
``samples / evals`` sequences, so the numbers are that coarse).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.common import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bpb", type=float, default=3.0, help="target validation bits/byte")
    parser.add_argument("--comparison", default="policies")
    parser.add_argument("--curves", type=Path, default=RESULTS / "lm_curves.csv")
    args = parser.parse_args()
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with args.curves.open() as f:
        for row in csv.DictReader(f):
            if row["comparison"] == args.comparison:
                runs[row["name"], row["seed"]].append(row)
    hits: dict[str, list[tuple[float, float, float] | None]] = defaultdict(list)
    for (name, _), rows in runs.items():
        hit = next((r for r in rows if float(r["val_bpb"]) <= args.bpb), None)
        hits[name].append(
            None if hit is None else (float(hit["samples"]), float(hit["steps"]), float(hit["train_s"]))
        )
    print(
        f"{args.comparison}: first evaluation at or below {args.bpb} bits/byte "
        "(mean over the seeds that got there)"
    )
    for name, found in hits.items():
        ok = [h for h in found if h is not None]
        if not ok:
            print(f"  {name:12} 0/{len(found)}")
            continue
        samples, steps, seconds = (statistics.mean(h[k] for h in ok) for k in range(3))
        print(
            f"  {name:12} {len(ok)}/{len(found)}  {samples:8.0f} sequences  {steps:5.0f} steps  "
            f"{seconds:5.1f} s"
        )


if __name__ == "__main__":
    main()
