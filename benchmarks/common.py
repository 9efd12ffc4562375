"""What every benchmark shares: timing, the measured copy bandwidth, result rows, the table and the CSV.

Times are medians (with p20/p80) of repeated calls measured side by side in one process; on CUDA with
device events, on the CPU with ``time.perf_counter``. Bandwidth is reported against a measured ceiling:
the faster of a large ``dst.copy_(src)`` and ``a.add_(b)`` (bytes read + bytes written, on buffers well
beyond the last-level cache), not a datasheet number.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    """One measured (op, provider, case): milliseconds, bytes moved, and ratios filled in by ``finish``."""

    bench: str
    case: str
    provider: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    bytes_moved: int
    gbps: float = 0.0
    share_of_bw: float = 0.0
    vs_baseline: float = 0.0
    notes: str = field(default="")


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers, from ``/proc/cpuinfo`` (a virtual machine's
    name can be generic: "Intel(R) Xeon(R) Processor (family 6, model 167)"); else the platform's
    processor or machine type."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:  # the end of the first processor's block
                break
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def measure(
    fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 3
) -> tuple[float, float, float]:
    """p20, p50, p80 of ``fn``'s time in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    return quantiles([_time_once(fn, device) for _ in range(reps)])


class Timed(NamedTuple):
    """One provider of a case: ``fn`` is timed; ``setup`` (untimed) runs before every call, e.g. to refill
    an input that ``fn`` zeroes, so that no call runs on zeros."""

    provider: str
    fn: Callable[[], object]
    bytes_moved: int
    notes: str = ""
    setup: Callable[[], object] | None = None


def side_by_side(
    bench: str, case: str, timed: list[tuple], device: torch.device, reps: int = 20, warmup: int = 3
) -> list[Row]:
    """Time :class:`Timed` entries (or tuples of its fields) round-robin: rep ``i`` of every provider runs
    before rep ``i+1`` of any, so load from elsewhere on the machine hits all of them alike and their
    ratios stay meaningful."""
    entries = [Timed(*entry) for entry in timed]

    def call(entry: Timed) -> float:
        if entry.setup is not None:
            entry.setup()
            sync(device)
        return _time_once(entry.fn, device)

    for entry in entries:
        for _ in range(warmup):
            call(entry)
    times: list[list[float]] = [[] for _ in entries]
    for _ in range(reps):
        for slot, entry in zip(times, entries):
            slot.append(call(entry))
    return [
        Row(bench, case, e.provider, *quantiles(slot), e.bytes_moved, notes=e.notes)
        for slot, e in zip(times, entries)
    ]


def memory_bandwidth(device: torch.device, numel: int = 1 << 27) -> float:
    """Measured GB/s: the faster of a float32 ``copy_`` (8 B/element) and ``add_`` (12 B/element) over
    ``numel`` elements (512 MiB per tensor by default, beyond the caches), bytes read plus written."""
    a = torch.randn(numel, device=device)
    b = torch.randn(numel, device=device)
    copy_ms = measure(lambda: a.copy_(b), device, reps=10)[1]
    add_ms = measure(lambda: a.add_(b), device, reps=10)[1]
    return max(8 * numel / copy_ms, 12 * numel / add_ms) / 1e6


def finish(rows: list[Row], bandwidth_gbps: float, baseline: str) -> list[Row]:
    """Fill GB/s, share of the measured bandwidth, and time(baseline) / time(row) for each case."""
    base = {r.case: r.p50_ms for r in rows if r.provider == baseline}
    for r in rows:
        r.gbps = r.bytes_moved / r.p50_ms / 1e6 if r.bytes_moved else 0.0
        r.share_of_bw = r.gbps / bandwidth_gbps if bandwidth_gbps else 0.0
        r.vs_baseline = base[r.case] / r.p50_ms if r.case in base else float("nan")
    return rows


def print_table(rows: list[Row], baseline: str) -> None:
    header = (
        f"{'bench':<12} {'case':<22} {'provider':<24} {'p50 ms':>10} {'GB/s':>8} {'%bw':>6} "
        f"{'x vs ' + baseline:>16}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.bench:<12} {r.case:<22} {r.provider:<24} {r.p50_ms:>10.3f} {r.gbps:>8.1f} "
            f"{100 * r.share_of_bw:>5.0f}% {r.vs_baseline:>16.2f}"
        )


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write(rows: list[Row], name: str, out_dir: Path, device: torch.device, extra: dict | None = None) -> Path:
    """``<out_dir>/<name>.csv`` (one line per row) and ``<name>.json`` (environment + rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    meta = {"environment": environment(device), **(extra or {}), "rows": [asdict(r) for r in rows]}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return path


def default_out_dir(device: torch.device) -> Path:
    """``benchmarks/results/<device>-<date>``: one folder per machine and day."""
    slug = re.sub("[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return RESULTS / f"{slug}-{dt.date.today().isoformat()}"
