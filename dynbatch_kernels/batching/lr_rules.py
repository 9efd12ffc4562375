"""Learning rates that follow the batch size (docs/algorithms.md), relative to a reference point.

The reference is the optimizer's own learning rate ``lr0`` (per param group), taken to be right at batch
size ``batch_ref``. A rule returns the factor that multiplies ``lr0`` for a step of ``B`` samples::

    linear:  B / B0
    sqrt:    sqrt(B / B0)
    sgd:     f(B) / f(B0),  f(B) = 1 / (1 + B_noise / B)                              [McC18]
    surge:   f(B) / f(B0),  f(B) = 1 / (0.5 * (sqrt(B_noise / B) + sqrt(B / B_noise)))  [Li24, Adam-style]

For ``sgd`` and ``surge``, ``lr_max = lr0 / f(B0)`` is calibrated once, at ``noise_ref``, and from then on
``lr = lr_max * f(B)`` with the current ``B_noise``: the surge rule peaks at ``B = B_noise`` and the peak
moves as the noise scale grows. Without an explicit ``noise_ref`` the rule calibrates on the
``warmup_steps``-th usable (finite, positive) estimate it is passed (the accumulator passes its EMA), and
the factor is 1 until then: a single step's estimate is too noisy to anchor a whole run on (a signal estimate
``|G_true|^2`` near 0 makes it huge or infinite). The default of 20 is two time constants ``1 / (1 - beta)``
of the accumulator's EMA (``noise_beta = 0.9``): its effective sample size ``(sum w)^2 / sum w^2`` is then
15 steps, against 9 after 10 steps and 19 at most. After calibration the last usable estimate is kept.

``lr0`` is whatever the optimizer's groups hold when the step is taken, so an LR scheduler (warm-up,
cosine) keeps working: :func:`scaled_lrs` multiplies every group's lr by the factor for the optimizer's
step only and then puts the scheduler's values back (a chained scheduler such as ``ExponentialLR``, which
reads the current lr, never sees, and so never compounds, the factor).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


class LRRule:
    """Base class: ``factor(batch_size, noise_scale)`` multiplies the reference learning rate."""

    name = ""

    def __init__(self, batch_ref: int):
        if not isinstance(batch_ref, int) or batch_ref < 1:
            raise ValueError(f"batch_ref: expected an int >= 1, got {batch_ref!r}")
        self.batch_ref = batch_ref

    def factor(self, batch_size: int, noise_scale: float) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"batch_ref": self.batch_ref}

    def load_state_dict(self, state: dict) -> None:
        self.batch_ref = int(state["batch_ref"])


class LinearRule(LRRule):
    """``lr = lr0 * B / B0`` (Goyal et al.'s linear scaling)."""

    name = "linear"

    def factor(self, batch_size: int, noise_scale: float) -> float:
        return batch_size / self.batch_ref


class SqrtRule(LRRule):
    """``lr = lr0 * sqrt(B / B0)`` (square-root scaling)."""

    name = "sqrt"

    def factor(self, batch_size: int, noise_scale: float) -> float:
        return math.sqrt(batch_size / self.batch_ref)


class _NoiseRule(LRRule):
    """A rule ``lr_max * f(B, B_noise)`` with ``lr_max = lr0 / f(B0, noise_ref)``.

    ``noise_ref=None``: calibrated on the ``warmup_steps``-th usable estimate passed to :meth:`factor`
    (``usable`` counts them); factor 1 until then.
    """

    def __init__(self, batch_ref: int, noise_ref: float | None = None, *, warmup_steps: int = 20):
        super().__init__(batch_ref)
        if noise_ref is not None and not (math.isfinite(noise_ref) and noise_ref > 0):
            raise ValueError(f"noise_ref: expected a finite positive noise scale or None, got {noise_ref}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an int >= 1, got {warmup_steps!r}")
        self.noise_ref = noise_ref
        self.noise_scale = noise_ref
        self.warmup_steps = warmup_steps
        self.usable = 0

    @staticmethod
    def shape(batch_size: float, noise_scale: float) -> float:
        raise NotImplementedError

    def factor(self, batch_size: int, noise_scale: float) -> float:
        if math.isfinite(noise_scale) and noise_scale > 0:
            self.noise_scale = noise_scale
            self.usable += 1
            if self.noise_ref is None and self.usable >= self.warmup_steps:
                self.noise_ref = noise_scale
        if self.noise_ref is None:
            return 1.0
        return self.shape(batch_size, self.noise_scale) / self.shape(self.batch_ref, self.noise_ref)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "noise_ref": self.noise_ref,
            "noise_scale": self.noise_scale,
            "warmup_steps": self.warmup_steps,
            "usable": self.usable,
        }

    def load_state_dict(self, state: dict) -> None:
        """Also loads a state saved before the warm-up existed (calibrated on the first usable estimate):
        it keeps this rule's ``warmup_steps`` and counts usable estimates from 0, which matters only if it
        was not calibrated yet."""
        super().load_state_dict(state)
        self.noise_ref, self.noise_scale = state["noise_ref"], state["noise_scale"]
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))
        self.usable = int(state.get("usable", 0))


class SGDRule(_NoiseRule):
    """``lr = lr_max / (1 + B_noise / B)`` [McC18]."""

    name = "sgd"

    @staticmethod
    def shape(batch_size: float, noise_scale: float) -> float:
        return 1.0 / (1.0 + noise_scale / batch_size)


class SurgeRule(_NoiseRule):
    """``lr = lr_max / (0.5 * (sqrt(B_noise / B) + sqrt(B / B_noise)))`` [Li24], for Adam-style optimizers."""

    name = "surge"

    @staticmethod
    def shape(batch_size: float, noise_scale: float) -> float:
        ratio = math.sqrt(noise_scale / batch_size)
        return 1.0 / (0.5 * (ratio + 1.0 / ratio))


@contextlib.contextmanager
def scaled_lrs(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Within the block every param group's lr is ``factor`` times its own; restored exactly on exit.

    A tensor lr (capturable / fused optimizers) is scaled and restored in place.
    """
    groups = optimizer.param_groups
    saved = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in groups]
    for group in groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].mul_(factor)
        else:
            group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(groups, saved):
            if isinstance(lr, torch.Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr


LR_RULES: dict[str, type[LRRule]] = {r.name: r for r in (SurgeRule, SGDRule, LinearRule, SqrtRule)}


def make_lr_rule(name: str, batch_ref: int) -> LRRule | None:
    """The rule called ``name`` (``none`` gives None) with reference batch size ``batch_ref``."""
    if name == "none":
        return None
    if name not in LR_RULES:
        raise ValueError(f"name: expected one of {['none', *LR_RULES]}, got {name!r}")
    return LR_RULES[name](batch_ref)
