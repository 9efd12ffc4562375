"""Batch policies: when to end an accumulation and take an optimizer step.

A policy sees one :class:`Observation` per accepted micro-batch (host floats and the ``[S, 4]`` host sums,
never device tensors) and answers :meth:`BatchPolicy.observe` -> ``True`` to end the accumulation there.
Every policy enforces its ``[min_samples, max_samples]`` bounds: the maximum forces a step, so a rule that
never fires still steps (``fired`` tells the two apart). After the step (or the drop) the accumulator
calls :meth:`BatchPolicy.end_step` with the step's :class:`StepSummary`; :meth:`BatchPolicy.guard` may veto
the step (the angle guard).
``state_dict()`` / ``load_state_dict()`` cover everything a decision depends on, random state included.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from dynbatch_kernels import stats
from dynbatch_kernels.batching.estimators import StepEstimate
from dynbatch_kernels.ops import ACC_DOT, ACC_NEW_SQ, ACC_OLD_SQ


class Observation(NamedTuple):
    """What a policy sees of micro-batch ``k`` of the current step (all host values; immutable: a named
    tuple, built once per micro-batch in under half a frozen dataclass's time).

    ``sums`` are the fused op's ``[S, 4]`` sums of this micro-batch, one row of floats per segment of the
    layout (buffers in order; unscaled: a GradScaler's loss scale is divided out); ``angle`` is the
    whole-model angle (NaN for ``k = 1``); ``lr`` is the first param group's lr as the scheduler set it
    (before any LR rule's factor); ``trace`` and ``noise_scale`` are the accumulator's averaged estimates
    from completed steps (NaN before the first).
    """

    micro_batch: int
    samples: int
    total_samples: int
    sums: list[list[float]]
    angle: float
    loss: float
    lr: float
    trace: float
    noise_scale: float


def column_sums(rows: Sequence[Sequence[float]]) -> list[float]:
    """The four columns of ``[S, 4]`` host sums added over their rows (segments)."""
    return list(map(sum, zip(*rows)))


def sums_angle(row: Sequence[float]) -> float:
    """Host twin of :func:`~dynbatch_kernels.stats.angle` for one row ``[ACC_DOT, GRAD_SQ, ACC_OLD_SQ,
    ACC_NEW_SQ]`` already read back: ``acos((|a|^2 + a.g) / sqrt(|a|^2 |a'|^2))`` in degrees, NaN when
    ``|a| = 0`` (the first micro-batch) or the sums are not finite."""
    norms = row[ACC_OLD_SQ] * row[ACC_NEW_SQ]
    if not norms > 0 or math.isinf(norms):
        return math.nan
    return stats.angle_from_cosine((row[ACC_OLD_SQ] + row[ACC_DOT]) / math.sqrt(norms))


class StepSummary(NamedTuple):
    """One finished accumulation: its size, its variance estimate (None when ``K < 2``), mean loss, lr."""

    micro_batches: int
    samples: int
    estimate: StepEstimate | None
    loss: float
    lr: float
    stepped: bool


class BatchPolicy:
    """Base class: ``observe`` = the subclass's :meth:`decide` within ``[min_samples, max_samples]``."""

    def __init__(self, min_samples: int = 1, max_samples: int = 2048):
        if not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples: expected an int >= 1, got {min_samples!r}")
        if not isinstance(max_samples, int) or max_samples < min_samples:
            raise ValueError(
                f"max_samples: expected an int >= min_samples={min_samples}, got {max_samples!r}"
            )
        self.min_samples = min_samples
        self.max_samples = max_samples
        self.fired = False  # the rule itself (not the maximum) asked for a step since the last one

    def bind(self, names: Sequence[str]) -> None:
        """Called once by the accumulator with the segment names, in the order of the sums' rows."""

    def observe(self, obs: Observation) -> bool:
        """Whether to end the accumulation after this micro-batch (``decide`` always runs first)."""
        wants = self.decide(obs) and obs.total_samples >= self.min_samples
        self.fired = self.fired or wants
        return wants or self.reached_max(obs.total_samples)

    def reached_max(self, total_samples: int) -> bool:
        """The count-only stop, also asked for a micro-batch whose sums are not read yet."""
        return total_samples >= self.max_samples

    def decide(self, obs: Observation) -> bool:
        """The policy's own rule, before the bounds."""
        raise NotImplementedError

    def guard(self) -> bool:
        """Whether the accumulation that just ended may be applied (False drops it)."""
        return True

    def end_step(self, summary: StepSummary) -> None:
        """Reset per-step state and update per-run estimates once the step is applied or dropped."""
        self.fired = False

    def state_dict(self) -> dict:
        return {"min_samples": self.min_samples, "max_samples": self.max_samples, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.min_samples, self.max_samples = int(state["min_samples"]), int(state["max_samples"])
        self.fired = bool(state["fired"])


class FixedPolicy(BatchPolicy):
    """The baseline: step once ``num_samples`` samples are accumulated."""

    def __init__(self, num_samples: int):
        super().__init__(min_samples=num_samples, max_samples=num_samples)

    def decide(self, obs: Observation) -> bool:
        return obs.total_samples >= self.max_samples


def infer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Candidate groups from numbered name prefixes: ``layers.3.fc1.weight`` -> group ``layers.3.``.

    Parameters without a numbered component (embeddings, input and output layers) join no group, as in
    [Xu20], where only the transformer layers were candidates.
    """
    pattern = re.compile(r"^((?:.*?\.)?\d+\.)")
    groups: dict[str, list[str]] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            groups.setdefault(match.group(1), []).append(name)
    if not groups:
        raise ValueError(
            "groups: 'auto' found no parameter name with a numbered prefix such as 'layers.3.'; "
            f"pass groups explicitly (names seen: {list(names)[:4]}...)"
        )
    return groups


class AnglePolicy(BatchPolicy):
    """Step when the gradient direction stops settling [Xu20], with the rule of the authors' code.

    After micro-batch ``k >= 2`` the angle between the accumulated gradients before and after it::

        first angle                     -> a_min
        angle >= tolerance * a_min      -> step
        angle <  a_min                  -> a_min = angle
        otherwise                       -> count += 1; step when count == patience (never reset in a step)
        guard (every step, forced ones too): apply only if the last angle <= guard_degrees / tolerance,
        else drop the accumulated gradient (no optimizer or LR-schedule step).

    ``groups=None`` monitors the whole model. Otherwise ``groups`` is ``"auto"`` (numbered name prefixes,
    see :func:`infer_groups`) or a mapping ``{group: [parameter names or name prefixes]}``; one group
    drives each step's decision, drawn from ``softmax(weights)``, and re-drawn after every step. A group's
    weight is an EMA (``score_beta``, start 1.0) of its per-step score ``(max - min) / max`` of its angles.
    The fused sums give every group's angles at no cost, so with ``score_all_groups`` (default) every
    group's weight is updated each step; the paper, which paid for each monitored angle, updated only the
    monitored group's (``score_all_groups=False``).

    A group whose accumulated gradient is all zero (``|A|^2 = 0``: frozen or unused layers) has no angle.
    It is marked ``zero`` (per group, from its last micro-batch seen) and not drawn while it stays so; when
    the monitored group is all zero after a micro-batch, the whole model drives the rest of the step.
    """

    def __init__(
        self,
        tolerance: float = 1.1,
        patience: int = 3,
        guard_degrees: float = 90.0,
        min_samples: int = 1,
        max_samples: int = 2048,
        groups: str | Mapping[str, Sequence[str]] | None = None,
        score_beta: float = 0.5 ** (1 / 50),
        score_all_groups: bool = True,
        seed: int = 0,
    ):
        super().__init__(min_samples, max_samples)
        if not tolerance > 1.0:
            raise ValueError(f"tolerance: expected a value > 1, got {tolerance}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: expected an int >= 1, got {patience!r}")
        if not 0.0 < guard_degrees <= 180.0:
            raise ValueError(f"guard_degrees: expected a value in (0, 180], got {guard_degrees}")
        if not 0.0 <= score_beta < 1.0:
            raise ValueError(f"score_beta: expected a value in [0, 1), got {score_beta}")
        if not (groups is None or groups == "auto" or isinstance(groups, Mapping)):
            raise ValueError(f"groups: expected None, 'auto' or a mapping of names, got {groups!r}")
        self.tolerance, self.patience, self.guard_degrees = tolerance, patience, guard_degrees
        self.groups_spec, self.score_beta, self.score_all_groups = groups, score_beta, score_all_groups
        self.group_names: list[str] = []
        self._members: list[list[int]] | None = None  # per group: its segments (rows of the sums)
        self.weights: list[float] = []
        self.zero: list[bool] = []  # per group: its accumulated gradient was all zero when last seen
        self.group = 0
        self._rng = random.Random(seed)
        self._reset_step()

    def _reset_step(self) -> None:
        self.a_min = math.nan
        self.count = 0
        self.fallback = False  # the monitored group is all zero: the whole model drives this step
        self.angles: list[float] = []  # the monitored angles of this step
        self.group_angles: list[list[float]] = [[] for _ in self.group_names]

    @property
    def monitored(self) -> str | None:
        """The name of the group driving this step's decision (None: the whole model)."""
        return self.group_names[self.group] if self.group_names and not self.fallback else None

    def bind(self, names: Sequence[str]) -> None:
        """(Re)build the group membership. Called again when the optimizer's parameters change: weights
        and zero marks are kept by group name (a new group starts at 1.0, not zero); a change of the group
        set restarts the step's rule and re-draws the monitored group."""
        if self.groups_spec is None:
            return
        spec = infer_groups(names) if self.groups_spec == "auto" else self.groups_spec
        members = []
        for group, entries in spec.items():
            members.append([j for j, name in enumerate(names) if any(name.startswith(e) for e in entries)])
            if not members[-1]:
                raise ValueError(f"groups: group {group!r} matches no parameter name (entries {entries})")
        self._members = members
        if list(spec) != self.group_names:
            weights, zero = dict(zip(self.group_names, self.weights)), dict(zip(self.group_names, self.zero))
            self.group_names = list(spec)
            self.weights = [weights.get(g, 1.0) for g in self.group_names]
            self.zero = [zero.get(g, False) for g in self.group_names]
            self._reset_step()
            self._draw()

    def decide(self, obs: Observation) -> bool:
        angle = obs.angle
        if self._members is not None:
            for g, rows in enumerate(self._members):
                row = column_sums([obs.sums[j] for j in rows])
                self.zero[g] = not row[ACC_NEW_SQ] > 0
                self.group_angles[g].append(sums_angle(row))
            self.fallback = self.fallback or self.zero[self.group]
            if not self.fallback:
                angle = self.group_angles[self.group][-1]
        if math.isnan(angle):  # k = 1: no previous direction
            return False
        self.angles.append(angle)
        if math.isnan(self.a_min):
            self.a_min = angle
            return False
        if angle >= self.tolerance * self.a_min:
            return True
        if angle < self.a_min:
            self.a_min = angle
            return False
        self.count += 1
        return self.count >= self.patience

    def guard(self) -> bool:
        return not self.angles or self.angles[-1] <= self.guard_degrees / self.tolerance

    def end_step(self, summary: StepSummary) -> None:
        super().end_step(summary)
        if self.group_names:
            scored = range(len(self.group_names)) if self.score_all_groups else [self.group]
            for g in scored:
                angles = [a for a in self.group_angles[g] if not math.isnan(a)]
                if angles and max(angles) > 0:
                    score = (max(angles) - min(angles)) / max(angles)
                    self.weights[g] = self.score_beta * self.weights[g] + (1 - self.score_beta) * score
            self._draw()
        self._reset_step()

    def _draw(self) -> None:
        """Draw the next monitored group from ``softmax(weights)`` over the groups not marked zero (or over
        all of them if every one is)."""
        live = [not z for z in self.zero] if not all(self.zero) else [True] * len(self.zero)
        top = max(w for w, ok in zip(self.weights, live) if ok)
        odds = [math.exp(w - top) if ok else 0.0 for w, ok in zip(self.weights, live)]
        self.group = self._rng.choices(range(len(self.weights)), odds)[0]

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "a_min": self.a_min,
            "count": self.count,
            "angles": list(self.angles),
            "group_angles": [list(a) for a in self.group_angles],
            "group_names": list(self.group_names),
            "weights": list(self.weights),
            "zero": list(self.zero),
            "fallback": self.fallback,
            "group": self.group,
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        """A state saved before the zero marks existed loads with none marked (its old behaviour)."""
        super().load_state_dict(state)
        if list(state["group_names"]) != self.group_names:
            raise ValueError(
                f"state: expected groups {self.group_names} (bind first), got {list(state['group_names'])}"
            )
        self.a_min, self.count = float(state["a_min"]), int(state["count"])
        self.angles = list(state["angles"])
        self.group_angles = [list(a) for a in state["group_angles"]]
        self.weights, self.group = list(state["weights"]), int(state["group"])
        self.zero = [bool(z) for z in state.get("zero", [False] * len(self.group_names))]
        self.fallback = bool(state.get("fallback", False))
        self._rng.setstate(state["rng"])


class _VariancePolicy(BatchPolicy):
    """A policy whose target needs the variance estimate: it never ends a step before ``K = 2``."""

    def decide(self, obs: Observation) -> bool:
        return obs.micro_batch >= 2 and obs.total_samples >= self.target(obs)

    def target(self, obs: Observation) -> float:
        raise NotImplementedError


class NoiseScalePolicy(_VariancePolicy):
    """Step once the batch reaches the averaged noise scale ``B_simple`` [McC18], clamped to the bounds.

    Before the first estimate the target is ``initial_samples`` (default ``min_samples``). Every step has
    at least two micro-batches, the least the variance estimate needs.
    """

    def __init__(self, min_samples: int = 1, max_samples: int = 2048, initial_samples: int | None = None):
        super().__init__(min_samples, max_samples)
        self.initial_samples = min_samples if initial_samples is None else initial_samples
        if not min_samples <= self.initial_samples <= max_samples:
            raise ValueError(
                f"initial_samples: expected a value in [{min_samples}, {max_samples}], got {initial_samples}"
            )

    def target(self, obs: Observation) -> float:
        if math.isnan(obs.noise_scale):
            return self.initial_samples
        return min(max(obs.noise_scale, self.min_samples), self.max_samples)


class CABSPolicy(_VariancePolicy):
    """Coupled adaptive batch size [Bal16]: ``B = clip(round(c * lr * tr(Sigma)_ema / L_ema), B_min, B_max)``.

    After every step, ``tr(Sigma)_ema <- mu*. + (1-mu)*tr(Sigma)`` (starting at 0) and ``L_ema <- mu*. +
    (1-mu)*L`` (starting at 1.0, no bias correction, as in the authors' code), with ``L`` the step's mean
    training loss and ``lr`` the step's learning rate; the next step ends once it holds ``B`` samples. The
    authors estimate ``tr(Sigma)`` from per-example gradients of one batch; here it is the micro-batch
    estimator of :mod:`~dynbatch_kernels.batching.estimators` (hence at least two micro-batches per step).
    The rule assumes the achievable loss is about 0 and was designed for plain SGD.
    """

    def __init__(self, min_samples: int = 16, max_samples: int = 2048, c: float = 1.0, mu: float = 0.95):
        super().__init__(min_samples, max_samples)
        if not c > 0:
            raise ValueError(f"c: expected a positive factor, got {c}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu: expected a value in [0, 1), got {mu}")
        self.c, self.mu = c, mu
        self.trace_ema, self.loss_ema = 0.0, 1.0
        self.batch_size = min_samples

    def decide(self, obs: Observation) -> bool:
        if math.isnan(obs.loss):
            raise ValueError(
                "loss: CABSPolicy needs each micro-batch's loss, got none; pass accumulate(loss=...)"
            )
        return super().decide(obs)

    def target(self, obs: Observation) -> float:
        return self.batch_size

    def end_step(self, summary: StepSummary) -> None:
        super().end_step(summary)
        if summary.estimate is not None and math.isfinite(summary.estimate.trace):
            self.trace_ema = self.mu * self.trace_ema + (1 - self.mu) * summary.estimate.trace
        if math.isfinite(summary.loss):
            self.loss_ema = self.mu * self.loss_ema + (1 - self.mu) * summary.loss
        wanted = self.c * summary.lr * self.trace_ema / self.loss_ema if self.loss_ema > 0 else math.inf
        wanted = round(wanted) if math.isfinite(wanted) else self.max_samples
        self.batch_size = min(max(wanted, self.min_samples), self.max_samples)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "trace_ema": self.trace_ema,
            "loss_ema": self.loss_ema,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.trace_ema, self.loss_ema = float(state["trace_ema"]), float(state["loss_ema"])
        self.batch_size = int(state["batch_size"])
