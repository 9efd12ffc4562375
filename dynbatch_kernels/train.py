"""The main job: train the digits MLP with micro-batch accumulation under a batch policy.

:func:`train` runs one (policy, optimizer, LR rule, seed) configuration and returns a :class:`RunResult`
with the accumulator's per-step history and a validation curve; :func:`format_table` and
:func:`plot_runs` summarise several runs. The loop is the one a user writes (see
:class:`~dynbatch_kernels.batching.GradientAccumulator`); progress is reported through a callback so
the command line can draw a bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynbatch_kernels.batching import (
    AnglePolicy,
    BatchPolicy,
    CABSPolicy,
    FixedPolicy,
    GradientAccumulator,
    NoiseScalePolicy,
    StepRecord,
    make_lr_rule,
)
from dynbatch_kernels.data import Dataset, DigitsMLP, evaluate, load_digits_split, micro_batches
from dynbatch_kernels.extras import import_extra
from dynbatch_kernels.optim import ExtrapSGD, FusedLAMB

logger = logging.getLogger(__name__)

POLICIES = ("angle", "cabs", "noise", "fixed")
OPTIMIZERS = ("lamb", "adamw", "sgd", "extrap")
LR_RULE_NAMES = ("none", "surge", "sgd", "linear", "sqrt")
#: Learning rates tuned once on this task at the reference batch size (``TrainConfig.lr_ref_batch``).
DEFAULT_LR = {"lamb": 1e-2, "adamw": 3e-3, "sgd": 0.1, "extrap": 0.1}


@dataclass(frozen=True)
class TrainConfig:
    """One run. ``batch``: the fixed policy's batch size (and the noise policy's first target);
    ``lr_ref_batch``: the batch size at which ``lr`` is right, the LR rules' reference point."""

    policy: str = "fixed"
    optimizer: str = "lamb"
    lr_rule: str = "none"
    lr: float | None = None
    epochs: float = 10.0
    micro_batch: int = 16
    batch: int = 64
    min_batch: int = 16
    max_batch: int = 1024
    lr_ref_batch: int = 64
    cabs_c: float = 1.0
    width: int = 64
    depth: int = 2
    seed: int = 0
    device: str = "cpu"
    target_loss: float | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("policy", self.policy, POLICIES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr_rule", self.lr_rule, LR_RULE_NAMES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if not self.micro_batch <= self.min_batch <= self.batch <= self.max_batch:
            raise ValueError(
                "micro_batch, min_batch, batch, max_batch: expected micro_batch <= min_batch <= batch <= "
                f"max_batch, got {self.micro_batch}, {self.min_batch}, {self.batch}, {self.max_batch}"
            )
        if self.lr_ref_batch < 1:
            raise ValueError(f"lr_ref_batch: expected a batch size >= 1, got {self.lr_ref_batch}")
        if not self.epochs > 0:
            raise ValueError(f"epochs: expected a positive number of epochs, got {self.epochs}")


@dataclass
class RunResult:
    """A finished run: the accumulator's history and ``(samples, steps, seconds, val loss, val acc)`` rows."""

    config: TrainConfig
    optimizer: str
    lr: float
    history: list[StepRecord]
    curve: list[tuple[int, int, float, float, float]] = field(default_factory=list)
    wall_s: float = 0.0
    reached: tuple[int, float] | None = None  # (samples, seconds) when target_loss was first reached

    @property
    def steps(self) -> int:
        return sum(not r.dropped for r in self.history)

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.history)

    @property
    def mean_batch(self) -> float:
        applied = [r.samples for r in self.history if not r.dropped]
        return sum(applied) / len(applied) if applied else math.nan

    @property
    def final(self) -> tuple[float, float]:
        """Final validation (loss, accuracy)."""
        return self.curve[-1][3:] if self.curve else (math.nan, math.nan)


def make_optimizer(name: str, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer called ``name`` at ``lr`` (default: :data:`DEFAULT_LR` of what is built).

    ``lamb`` is :class:`~dynbatch_kernels.optim.FusedLAMB`; ``extrap`` is
    :class:`~dynbatch_kernels.optim.ExtrapSGD` in ``"past"`` mode (one backward per step).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name: expected one of {OPTIMIZERS}, got {name!r}")
    params = list(model.parameters())
    lr = DEFAULT_LR[name] if lr is None else lr
    if name == "lamb":
        return FusedLAMB(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return ExtrapSGD(params, lr=lr, mode="past")


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The short name of an optimizer built by :func:`make_optimizer`."""
    return {"FusedLAMB": "lamb", "AdamW": "adamw", "SGD": "sgd", "ExtrapSGD": "extrap"}.get(
        type(optimizer).__name__, type(optimizer).__name__
    )


def make_policy(config: TrainConfig) -> BatchPolicy:
    """The batch policy of ``config``, bounded by ``[min_batch, max_batch]``."""
    bounds = {"min_samples": config.min_batch, "max_samples": config.max_batch}
    if config.policy == "fixed":
        return FixedPolicy(config.batch)
    if config.policy == "angle":
        return AnglePolicy(**bounds, groups="auto", seed=config.seed)
    if config.policy == "noise":
        return NoiseScalePolicy(**bounds, initial_samples=config.batch)
    return CABSPolicy(**bounds, c=config.cabs_c)


def train(config: TrainConfig, progress: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train for ``config.epochs`` epochs (or until ``target_loss``), evaluating after every step.

    Wall times count training only, not the evaluations. An accumulation still open when the sample
    budget runs out is discarded: a smaller final step is not what the policy chose (and under LAMB a step
    has the same size whatever its batch).

    ``progress(micro_batches_done, info)`` is called after every micro-batch with the last step's batch
    size and mean training loss and the last micro-batch's angle (no extra host reads).
    """
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    data = load_digits_split().to(device)
    model = DigitsMLP(config.width, config.depth).to(device)
    optimizer = make_optimizer(config.optimizer, model, config.lr)
    acc = GradientAccumulator(
        optimizer,
        make_policy(config),
        make_lr_rule(config.lr_rule, config.lr_ref_batch),
        model=model,
        history_size=None,
    )
    result = RunResult(config, optimizer_name(optimizer), float(optimizer.param_groups[0]["lr"]), acc.history)
    # ExtrapSGD(mode="past") holds the extrapolated point between steps: evaluate at the iterate
    at_iterate = getattr(optimizer, "swap_to_iterate", contextlib.nullcontext)
    generator = torch.Generator().manual_seed(config.seed)
    budget = round(config.epochs * len(data.y_train))
    clock = _TrainingClock()

    seen, done = 0, 0
    while seen < budget and result.reached is None:
        for xb, yb in micro_batches(data.x_train, data.y_train, config.micro_batch, generator):
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            seen += len(yb)
            done += 1
            if acc.accumulate(len(yb), loss.detach()):
                logger.debug("step %s", acc.step())
                with clock.paused(), at_iterate():
                    _evaluate(result, model, data, clock.seconds)
            if progress is not None:
                last = acc.history[-1] if acc.history else None
                info = {"batch": last.samples if last else 0, "angle": acc.last_angle}
                progress(done, {**info, "loss": last.loss if last else math.nan})
            if seen >= budget or result.reached is not None:
                break
    result.wall_s = clock.seconds
    result.history = list(acc.history)
    acc.close()
    return result


class _TrainingClock:
    """Wall time spent training: the evaluations after each step are not counted."""

    def __init__(self) -> None:
        self._start, self._paused = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - began


def _evaluate(result: RunResult, model: nn.Module, data: Dataset, seconds: float) -> None:
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    result.curve.append((result.samples, result.steps, seconds, val_loss, val_acc))
    target = result.config.target_loss
    if target is not None and result.reached is None and val_loss <= target:
        result.reached = (result.samples, seconds)


def micro_batches_per_run(config: TrainConfig, train_size: int = 1437) -> int:
    """Micro-batches a run of ``config`` takes at most (for a progress bar's total)."""
    per_epoch = math.ceil(train_size / config.micro_batch)
    return math.ceil(config.epochs * per_epoch)


def format_table(runs: list[RunResult]) -> str:
    """One line per run: policy, optimizer, LR rule, steps, samples, wall time, final val loss/acc, mean B."""
    header = (
        f"{'policy':<7} {'optimizer':<9} {'lr rule':<7} {'steps':>6} {'samples':>8} {'wall s':>7} "
        f"{'val loss':>9} {'val acc':>8} {'mean B':>7} {'dropped':>7}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        c = run.config
        val_loss, val_acc = run.final
        dropped = sum(r.dropped for r in run.history)
        lines.append(
            f"{c.policy:<7} {run.optimizer:<9} {c.lr_rule:<7} {run.steps:>6} {run.samples:>8} "
            f"{run.wall_s:>7.2f} {val_loss:>9.4f} {val_acc:>8.3f} {run.mean_batch:>7.1f} {dropped:>7}"
        )
    return "\n".join(lines)


SMOOTH = 5


def plot_runs(runs: list[RunResult], path: Path) -> Path:
    """A PNG of batch size, last angle (a moving mean) and validation loss per step, against samples seen."""
    import_extra("matplotlib", "demo").use("Agg")
    plt = import_extra("matplotlib.pyplot", "demo")

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for run in runs:
        label = f"{run.config.policy} ({run.optimizer}, lr rule {run.config.lr_rule})"
        seen, xs = 0, []
        for r in run.history:
            seen += r.samples
            xs.append(seen)
        axes[0].plot(xs, [r.samples for r in run.history], label=label, lw=1)
        angles = [(x, r.angles[-1]) for x, r in zip(xs, run.history) if r.angles]
        if len(angles) >= SMOOTH:
            x, a = zip(*angles)
            smooth = [sum(a[i - SMOOTH + 1 : i + 1]) / SMOOTH for i in range(SMOOTH - 1, len(a))]
            axes[1].plot(x[SMOOTH - 1 :], smooth, lw=1, label=label)
        axes[2].plot([row[0] for row in run.curve], [row[3] for row in run.curve], lw=1, label=label)
    axes[0].set(ylabel="batch size (samples)", yscale="log")
    axes[1].set(ylabel=f"last angle in step (deg,\nmean of {SMOOTH} steps)")
    axes[2].set(ylabel="validation loss", xlabel="training samples seen", yscale="log")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("digits MLP: batch policies")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
