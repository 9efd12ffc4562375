"""Gradient variance and noise scale from the fused accumulation sums (docs/algorithms.md).

The accumulator adds each micro-batch's mean gradient ``g_k`` with ``scale = n_k`` (its sample count), so
after ``K`` micro-batches it holds ``a = sum_k n_k g_k``, the sum of per-sample gradients, and the fused op
reports ``GRAD_SQ_k = n_k^2 |g_k|^2`` and ``ACC_NEW_SQ = |a|^2``. With ``N = sum_k n_k`` and ``G = a/N``::

    sum_k n_k |g_k - G|^2 = sum_k GRAD_SQ_k / n_k - |a|^2 / N      (expectation (K-1) tr(Sigma))
    tr(Sigma)   ~= (sum_k GRAD_SQ_k / n_k - |a|^2 / N) / (K - 1)   (per-sample covariance trace, K >= 2)
    |G_true|^2  ~= |a|^2 / N^2 - tr(Sigma) / N                     (unbiased)
    B_simple    =  tr(Sigma) / |G_true|^2                           (the gradient noise scale [McC18])

This is the sample-size-weighted form: with equal ``n_k = b`` it is ``b (sum |g_k|^2 - K|G|^2)/(K-1)``.
Under DDP every rank's micro-batch is one of ``P = R K`` parts (``K - 1`` becomes ``P - 1``): with ``K = 1``
and equal ``n_r = b`` this is [McC18]'s two-batch estimate from ``b`` and ``B = R b``, ``tr(Sigma) ~=
(|G_small|^2 - |G_big|^2) / (1/b - 1/B)`` with ``|G_small|^2 = mean_r |g_r|^2`` and ``|G_big|^2 = |G|^2``.
Single-step estimates are noisy (``|G_true|^2`` is often negative), so :class:`NoiseScaleEstimator` keeps
bias-corrected exponential moving averages of ``tr(Sigma)`` and ``|G_true|^2`` and reports the ratio of
the averages. Everything here is host arithmetic on a few floats per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class StepEstimate(NamedTuple):
    """One optimizer step's raw estimates: ``tr(Sigma)`` per sample and ``|G_true|^2``."""

    trace: float
    grad_sq: float

    @property
    def noise_scale(self) -> float:
        """``tr(Sigma) / |G_true|^2``: ``inf`` when the signal estimate is not positive."""
        return self.trace / self.grad_sq if self.grad_sq > 0 else math.inf


class VarianceSums:
    """The running host sums of one step: ``K``, ``N``, the parts ``P`` and ``sum_p GRAD_SQ_p / n_p``.

    A part is one micro-batch of one rank: ``P = K`` in one process, ``P = R K`` under DDP with ``R``
    ranks, where the ranks' micro-batches are the small batches of [McC18]'s two-batch estimate.
    """

    def __init__(self) -> None:
        self.micro_batches = 0
        self.samples = 0
        self.parts = 0
        self.weighted_grad_sq = 0.0

    def add(self, samples: int, grad_sq: float) -> None:
        """Record micro-batch ``k`` of one process: ``samples = n_k`` and ``grad_sq = |n_k g_k|^2``."""
        self.add_parts(samples, grad_sq / samples, 1)

    def add_parts(self, samples: int, weighted_grad_sq: float, parts: int) -> None:
        """Record micro-batch ``k`` made of ``parts`` parts: ``samples = sum_p n_p`` and ``weighted_grad_sq
        = sum_p n_p |g_p|^2``."""
        self.micro_batches += 1
        self.samples += samples
        self.parts += parts
        self.weighted_grad_sq += weighted_grad_sq

    def estimate(self, acc_sq: float) -> StepEstimate | None:
        """The step's estimates from ``acc_sq = |a|^2`` after its last micro-batch; None when ``P < 2``."""
        if self.parts < 2:
            return None
        n = self.samples
        trace = (self.weighted_grad_sq - acc_sq / n) / (self.parts - 1)
        return StepEstimate(trace=trace, grad_sq=acc_sq / n**2 - trace / n)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches, self.samples = int(state["micro_batches"]), int(state["samples"])
        self.parts, self.weighted_grad_sq = int(state["parts"]), float(state["weighted_grad_sq"])


class NoiseScaleEstimator:
    """Bias-corrected EMAs of ``tr(Sigma)`` and ``|G_true|^2`` over steps; ``B_simple`` is their ratio.

    ``ema <- beta*ema + (1-beta)*x`` for each, read as ``ema / (1 - beta^updates)``; the correction cancels
    in the ratio but makes ``trace`` and ``grad_sq`` usable from the first update.
    """

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta: expected a value in [0, 1), got {beta}")
        self.beta = beta
        self.updates = 0
        self._trace = 0.0
        self._grad_sq = 0.0

    def update(self, estimate: StepEstimate) -> None:
        """Fold in one step's estimate (non-finite estimates are ignored)."""
        if not (math.isfinite(estimate.trace) and math.isfinite(estimate.grad_sq)):
            return
        self.updates += 1
        self._trace = self.beta * self._trace + (1 - self.beta) * estimate.trace
        self._grad_sq = self.beta * self._grad_sq + (1 - self.beta) * estimate.grad_sq

    def _corrected(self, value: float) -> float:
        return value / (1 - self.beta**self.updates) if self.updates else math.nan

    @property
    def trace(self) -> float:
        """Averaged per-sample ``tr(Sigma)``; NaN before the first update."""
        return self._corrected(self._trace)

    @property
    def grad_sq(self) -> float:
        """Averaged ``|G_true|^2``; NaN before the first update."""
        return self._corrected(self._grad_sq)

    @property
    def noise_scale(self) -> float:
        """``B_simple``: NaN before the first update, ``inf`` while the averaged signal is not positive."""
        if not self.updates:
            return math.nan
        return StepEstimate(self._trace, self._grad_sq).noise_scale

    def state_dict(self) -> dict:
        return {"beta": self.beta, "updates": self.updates, "trace": self._trace, "grad_sq": self._grad_sq}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.updates = float(state["beta"]), int(state["updates"])
        self._trace, self._grad_sq = float(state["trace"]), float(state["grad_sq"])
