"""The figure of :mod:`benchmarks.lm_experiment`: validation loss against samples and against steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dynbatch_kernels.extras import import_extra

TOP = 9.0  # bits/byte; 8 at initialisation (uniform over 256 bytes)


def _band(curves: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, ...]:
    """Mean, min and max over seeds of curves interpolated onto a common grid (up to the shortest)."""
    grid = np.linspace(0, min(x[-1] for x, _ in curves), 50)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot(runs: list, path: Path) -> Path:
    """One row per comparison; validation bits per byte against samples (left) and steps (right), one line
    per method, shaded between the seeds' minimum and maximum; losses above :data:`TOP` (diverged) are
    off the chart."""
    import_extra("matplotlib", "demo").use("Agg")
    plt = import_extra("matplotlib.pyplot", "demo")
    comparisons = list(dict.fromkeys(r.method.comparison for r in runs))
    fig, axes = plt.subplots(len(comparisons), 2, figsize=(11, 3.6 * len(comparisons)), squeeze=False)
    for row, comparison in zip(axes, comparisons):
        mine = [r for r in runs if r.method.comparison == comparison]
        for name in dict.fromkeys(r.method.name for r in mine):
            seeds = [r for r in mine if r.method.name == name]
            for ax, column in zip(row, (0, 1)):
                curves = [
                    ([c[column] for c in r.curve], [c[3] / math.log(2) for c in r.curve]) for r in seeds
                ]
                grid, mean, low, high = _band(curves)
                (line,) = ax.plot(grid, mean, lw=1.2, label=name)
                ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
        row[0].set(title=comparison, xlabel="training samples (sequences)", ylabel="validation bits/byte")
        row[1].set(title=comparison, xlabel="optimizer steps", xscale="symlog")
        row[0].legend(fontsize=8)
        for ax in row:
            ax.set_ylim(top=TOP)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
