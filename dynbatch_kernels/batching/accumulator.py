"""GradientAccumulator: micro-batches -> fused accumulation -> policy decision -> optimizer step.

The user's loop (any ``torch.optim`` optimizer, any LR scheduler)::

    acc = GradientAccumulator(optimizer, policy, lr_rule)
    for xb, yb in loader:                                      # micro-batches
        loss = loss_fn(model(xb), yb)                          # mean over the micro-batch
        loss.backward()                                        # or scaler.scale(loss).backward()
        if acc.accumulate(num_samples=len(xb), loss=loss.detach()):
            record = acc.step()                                # optimizer (and scaler) step
            if record.applied:
                scheduler.step()                               # a dropped step advances nothing

Buffers, per (device, dtype) buffer of the layout (see :mod:`~dynbatch_kernels.batching.grads`: ``G`` =
the flat gradient the ``p.grad`` views live in, ``A`` = a float32 sum, ``A'`` = its spare):

- **per micro-batch** (``n_k`` samples, loss a mean): one fused pass ``A' = A + n_k * G; G <- 0`` with the
  per-segment sums (:func:`~dynbatch_kernels.ops.accumulate_` with ``out=A'``; in place into ``A = 0``
  for the step's first micro-batch); accepting the micro-batch swaps ``A`` and ``A'``. ``A`` holds the sum
  of per-sample gradients (times the loss scale under a GradScaler). Bytes per float32 element: 16.
  Gradients that are not ``G``'s views (after ``zero_grad(set_to_none=True)``, say) cost one copy each.
- **per step**: ``p.grad`` get the averaged gradient ``A * c / (N * S)`` (``N = sum n_k``, ``S`` the loss
  scale or 1, ``c = min(1, max_grad_norm / (|A| / (N * S) + 1e-6))`` the clip factor, ``|A|^2`` the last
  pass's ``ACC_NEW_SQ`` summed over segments: no pass of its own) and ``None`` where no micro-batch of the
  step reached the parameter.
  float32 gradients: ``A`` and ``G`` swap roles (no copy: ``p.grad`` become views into ``A``). An
  optimizer that speaks GradScaler's protocol (``_step_supports_amp_scaling``: FusedLAMB, torch's fused
  Adam/AdamW/SGD) gets ``grad_scale = N * S / c`` and divides while it reads: no extra pass; any other gets
  ``A *= c / (N * S)`` first (8 bytes). Then the optimizer's step, and ``G <- 0`` for the next backward.
  bfloat16/float16 gradients: ``G <- A * c / (N * S)``, ``A <- 0``, the step, ``G <- 0``.

**Non-finite gradients** are found from the sums (a non-finite ``GRAD_SQ`` or ``ACC_NEW_SQ``): the
micro-batch is dropped with a warning and counted in the record, and ``A`` stays exactly as it was (the
pass only read it; zeroed when it was the step's first). A roll-back by subtraction cannot be exact
(``inf - inf``, rounding), and a finiteness pre-check would need a host decision before the pass. Under
a GradScaler such a step also backs the scale off (see :mod:`~dynbatch_kernels.batching.amp`).

**Under DDP** (``model=`` a ``DistributedDataParallel`` module) the accumulator owns the communication
(:mod:`~dynbatch_kernels.batching.distributed`): per micro-batch one all-reduce of the sums, counts and
loss (plus, with ``ddp_sync="exact"``, one of ``G``); with ``ddp_sync="local"`` one all-reduce of ``A`` at
the step. Sample counts are global and every rank takes the same decisions; the sums are read at once.
Under FSDP2 (the optimizer's parameters are ``fully_shard`` DTensors; no ``model=`` needed) the fused pass
runs on the local shards of the gradients FSDP2 reduce-scattered, and one all-reduce per micro-batch of
the shards' sums, counts and loss makes them the whole tensors' (:class:`~dynbatch_kernels.batching.
distributed.ShardReducer`): every rank sees what one process sees on the ranks' micro-batches
concatenated. Every rank's micro-batches must have the same size (FSDP2 averages with equal weights).

**Host reads**: only the ``[S, 4]`` sums, the loss and (once per step) the loss scale leave the device. On
CUDA they go to pinned host memory by non-blocking copies and are read at the next call (``read_lag=1``),
so the GPU never waits for the host: a decision that needs the sums is one micro-batch late (the step
includes the micro-batch after the one where the policy fired); count-only stops (the maximum,
:class:`~dynbatch_kernels.batching.policies.FixedPolicy`) need no sums and stay exact. :meth:`step` reads
the last micro-batch's sums before applying (one event wait per step) so a non-finite micro-batch is never
applied. On the CPU the sums are read at once (``read_lag=0``) and decisions are exact.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import deque
from dataclasses import asdict, dataclass, field
from operator import attrgetter, is_

import torch
from torch.nn.parallel import DistributedDataParallel

from dynbatch_kernels import ops
from dynbatch_kernels.batching import amp
from dynbatch_kernels.batching.distributed import DDPReducer, ShardReducer
from dynbatch_kernels.batching.estimators import NoiseScaleEstimator, VarianceSums
from dynbatch_kernels.batching.grads import Index, StepBuffers
from dynbatch_kernels.batching.lr_rules import LRRule, scaled_lrs
from dynbatch_kernels.batching.policies import BatchPolicy, Observation, StepSummary, column_sums, sums_angle
from dynbatch_kernels.layout import FlatLayout
from dynbatch_kernels.optim.base import FlatOptimizer
from dynbatch_kernels.sharding import Sharding, is_dtensor

logger = logging.getLogger(__name__)
_requires_grad = attrgetter("requires_grad")  # for C-level loops (map) over the parameters

#: Records kept in :attr:`GradientAccumulator.history` by default (the most recent ones).
HISTORY_SIZE = 1024


@dataclass
class StepRecord:
    """One finished accumulation (applied or dropped).

    ``angles``: the whole-model angle after each accepted micro-batch ``k >= 2``; ``trace``, ``grad_sq``,
    ``noise_scale_step``: this step's raw ``tr(Sigma)``, ``|G_true|^2`` and their ratio (NaN when ``K < 2``);
    ``noise_scale``: the averaged ``B_simple`` after it; ``lr``: the first param group's lr applied (the
    scheduler's lr times the LR rule's factor; a dropped step: the scheduler's lr); ``grad_norm``: the
    global norm of the averaged (unscaled) gradient before clipping (NaN when dropped); ``loss``: the
    sample-weighted mean micro-batch loss; ``dropped``: nothing was applied (the policy's guard vetoed the
    step, or every micro-batch was non-finite): do not advance an LR scheduler (see :attr:`applied`);
    ``forced``: the policy's rule did not fire (``max_samples`` reached, or :meth:`GradientAccumulator.step`
    called early); ``nonfinite``: micro-batches dropped for a non-finite gradient; ``group``: the angle
    group that drove the decision, if any.
    """

    step: int
    micro_batches: int
    samples: int
    angles: list[float] = field(default_factory=list)
    trace: float = math.nan
    grad_sq: float = math.nan
    noise_scale_step: float = math.nan
    noise_scale: float = math.nan
    lr: float = math.nan
    grad_norm: float = math.nan
    loss: float = math.nan
    dropped: bool = False
    forced: bool = False
    nonfinite: int = 0
    group: str | None = None

    @property
    def applied(self) -> bool:
        """The optimizer stepped: advance LR schedulers (and anything else counted in steps) only then."""
        return not self.dropped


@dataclass(slots=True)
class _Pending:
    """A launched micro-batch whose sums are not read yet."""

    samples: int
    sums: list[list[float]] | None  # None: still on their way to ``_host_sums``
    loss: float  # NaN: none, or (``host_loss``) still on its way to ``_host_scalars``
    host_loss: bool
    from_zero: bool
    fresh: list[Index]
    events: list[torch.cuda.Event]
    weighted: float | None = None  # sum_r n_r |g_r|^2 (scaled) under DDP; None: GRAD_SQ / samples
    parts: int = 1  # the ranks' micro-batches in this one


class GradientAccumulator:
    """Accumulate micro-batch gradients in flat float32 buffers and step when ``policy`` says so.

    Args:
        optimizer: any ``torch.optim.Optimizer``. Its ``.layout`` (a :class:`FlatLayout`) is reused when it
            has one; otherwise a private one is built over its param groups (``bind=False``: the user's
            tensors stay where they are). Parameters may be frozen (``requires_grad=False``) and groups
            added (``add_param_group``), or the optimizer's ``layout`` replaced, at any time: the buffers
            follow at the next :meth:`accumulate` or :meth:`step`, mid-step carrying the accumulated sum
            over (a parameter new to the step counts from the micro-batch where it first has a gradient).
        policy: a :class:`~dynbatch_kernels.batching.policies.BatchPolicy`.
        lr_rule: optional :class:`~dynbatch_kernels.batching.lr_rules.LRRule`: for the optimizer's step
            only, every group's lr (as an LR scheduler set it) is multiplied by ``lr_rule.factor(N,
            B_noise)``; the scheduler's values are restored afterwards.
        scaler: optional ``torch.amp.GradScaler`` whose ``scaler.scale(loss).backward()`` produced the
            gradients. :meth:`step` unscales (folded into its division), steps and updates the scale; do
            not call ``scaler.step`` / ``scaler.update`` yourself. Policies and records see unscaled sums.
        max_grad_norm: clip the averaged gradient to this global L2 norm (as ``clip_grad_norm_``: factor
            ``min(1, max_grad_norm / (norm + 1e-6))``), the norm taken from the fused sums at no cost.
        model: optional module whose ``named_parameters()`` name the segments (for the angle groups). A
            ``DistributedDataParallel`` module makes the accumulator own the communication (see
            :mod:`~dynbatch_kernels.batching.distributed`): it turns DDP's sync off, and sample counts,
            sums, losses and decisions are global (the same on every rank). FSDP2 (``fully_shard``)
            parameters need no ``model``: their sums are reduced over the mesh by themselves.
        ddp_sync: under DDP, ``"local"`` (default: no gradient traffic until the step, one all-reduce of
            the accumulated buffer there; the policy sees the pooled within-rank angle) or ``"exact"``
            (every micro-batch's gradient all-reduced: the angle of the global accumulated gradient).
        noise_beta: EMA factor of the online noise-scale estimator.
        read_lag: 0 reads the sums at once, 1 one micro-batch later (default: 1 on CUDA, 0 otherwise).
        history_size: :attr:`history` keeps the last this many :class:`StepRecord` (default
            :data:`HISTORY_SIZE`); ``None`` keeps all.

    ``p.grad`` between micro-batches: :meth:`accumulate` takes the gradient and leaves every non-None
    ``p.grad`` a zeroed view into the accumulator's gradient buffer, so the next backward writes straight
    into it (the fast path). Replacing or clearing them (``zero_grad()``, assigning ``p.grad``) is fine: such
    gradients are copied in. At the step the optimizer finds the averaged gradient in ``p.grad``, and
    ``None`` for parameters that no micro-batch of the step reached (skipped: no update, no weight decay).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        policy: BatchPolicy,
        lr_rule: LRRule | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        model: torch.nn.Module | None = None,
        ddp_sync: str = "local",
        noise_beta: float = 0.9,
        read_lag: int | None = None,
        history_size: int | None = HISTORY_SIZE,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(policy, BatchPolicy):
            raise TypeError(f"policy: expected a BatchPolicy, got {type(policy).__name__}")
        if lr_rule is not None and not isinstance(lr_rule, LRRule):
            raise TypeError(f"lr_rule: expected an LRRule or None, got {type(lr_rule).__name__}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler: expected a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected None or a positive norm, got {max_grad_norm!r}")
        if history_size is not None and not (isinstance(history_size, int) and history_size >= 1):
            raise ValueError(f"history_size: expected None or an int >= 1, got {history_size!r}")
        self.optimizer, self.policy, self.lr_rule = optimizer, policy, lr_rule
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.max_grad_norm = max_grad_norm
        self.estimator = NoiseScaleEstimator(noise_beta)
        self.history: deque[StepRecord] = deque(maxlen=history_size)
        self.steps = 0  # finished accumulations, applied or dropped (the next record's ``step``)
        self.last_angle = math.nan  # the last whole-model angle of any step (for display)
        self._ddp = DDPReducer(model, ddp_sync) if isinstance(model, DistributedDataParallel) else None
        if self._ddp is not None:
            model = model.module
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._pending: _Pending | None = None
        self._buffers: StepBuffers | None = None
        layout = self._optimizer_layout()
        on_cuda = any(p.device.type == "cuda" for group in optimizer.param_groups for p in group["params"])
        sharded = any(is_dtensor(p) for group in optimizer.param_groups for p in group["params"])
        self.read_lag = int(on_cuda and self._ddp is None and not sharded) if read_lag is None else read_lag
        if self.read_lag not in (0, 1) or (self._ddp is not None and self.read_lag):
            raise ValueError(f"read_lag: expected 0 or 1 (0 under DDP), got {read_lag!r}")
        self._reset_step()
        self._rebuild(layout)

    @property
    def layout(self) -> FlatLayout:
        """The layout the buffers follow: the optimizer's, or the accumulator's own."""
        return self._buffers.layout

    # -- the user's two calls -------------------------------------------------------------------------

    def accumulate(self, num_samples: int, loss: torch.Tensor | float | None = None) -> bool:
        """Add the micro-batch gradient now in ``p.grad`` (``num_samples`` samples, a mean loss) and zero it.

        Returns whether to call :meth:`step` now (the policy fired, possibly one micro-batch ago on CUDA;
        it stays True until :meth:`step`). ``loss`` (the micro-batch's mean loss, detached and unscaled)
        feeds the record and the CABS policy.
        """
        if type(num_samples) is not int and (
            isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral)
        ):
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        if num_samples <= 0:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        self._follow_optimizer()
        if self._ddp is not None:
            self._ddp.check_unsynced()
        fresh = self._buffers.gather()
        if fresh is None:
            raise RuntimeError(
                "accumulate: expected a backward() since the last accumulate()/step(), got none; "
                "call loss.backward() on the micro-batch first"
            )
        if self._pending is not None:
            self._resolve()
        self._launch(int(num_samples), loss, fresh)
        if self.read_lag == 0:
            self._resolve()
        elif self.policy.reached_max(self._sums.samples + int(num_samples)):
            self._ready = True  # a count-only stop needs no sums: exact even when they are read late
        return self._ready

    @torch.no_grad()
    def step(self) -> StepRecord:
        """Apply the averaged gradient through the optimizer (unless the guard drops it), clear, record.

        Under a GradScaler the scale is then updated (backed off when a micro-batch overflowed). A dropped
        step (``record.dropped``, the angle guard's veto) changed nothing: advance an LR scheduler only
        when ``record.applied``.
        """
        self._follow_optimizer()
        if self._pending is not None:
            self._resolve()  # the one host wait per step on CUDA: never apply an unchecked micro-batch
        if not self.accumulated:
            raise RuntimeError("step: expected at least one accumulate() since the last step, got none")
        sums = self._sums
        if self._ddp is not None and not self._ddp.exact and sums.micro_batches:
            self._reduce_accumulated()
        estimate = sums.estimate(self._acc_sq)
        if estimate is not None:
            self.estimator.update(estimate)
        apply = sums.micro_batches > 0 and self.policy.guard()
        lr = _lr_value(self.optimizer.param_groups[0])
        forced = not self.policy.fired
        grad_norm = math.nan
        if apply:
            grad_norm = math.sqrt(self._acc_sq) / sums.samples
            clip = 1.0
            if self.max_grad_norm is not None:
                clip = min(1.0, self.max_grad_norm / (grad_norm + 1e-6))
            factor = (
                1.0 if self.lr_rule is None else self.lr_rule.factor(sums.samples, self.estimator.noise_scale)
            )
            self._apply(sums.samples * self._scale / clip, factor)
            lr *= factor
        else:
            why = "no finite micro-batch" if not sums.micro_batches else f"the guard (angles {self._angles})"
            logger.info("step %d dropped: %s", self.steps, why)
            self._buffers.discard()
        if self.scaler is not None:
            amp.update_scale(self.scaler, found_inf=self._nonfinite > 0)
        loss = self._loss_sum / self._loss_samples if self._loss_samples else math.nan
        group = getattr(self.policy, "monitored", None)  # read before end_step draws the next one
        self.policy.end_step(StepSummary(sums.micro_batches, sums.samples, estimate, loss, lr, stepped=apply))
        record = StepRecord(
            step=self.steps,
            micro_batches=sums.micro_batches,
            samples=sums.samples,
            angles=self._angles,
            trace=estimate.trace if estimate else math.nan,
            grad_sq=estimate.grad_sq if estimate else math.nan,
            noise_scale_step=estimate.noise_scale if estimate else math.nan,
            noise_scale=self.estimator.noise_scale,
            lr=lr,
            grad_norm=grad_norm,
            loss=loss,
            dropped=not apply,
            forced=forced,
            nonfinite=self._nonfinite,
            group=group,
        )
        self.history.append(record)
        self.steps += 1
        self._reset_step()
        return record

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Policy, estimator, LR rule, step count and history; call it between steps (after :meth:`step`).

        A GradScaler's state is the scaler's own (``scaler.state_dict()``).
        """
        if self.accumulated:
            raise RuntimeError(
                "state_dict: expected a step boundary, got micro-batches accumulated since the last step"
            )
        return {
            "policy": self.policy.state_dict(),
            "estimator": self.estimator.state_dict(),
            "lr_rule": None if self.lr_rule is None else self.lr_rule.state_dict(),
            "steps": self.steps,
            "history": [asdict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["lr_rule"] is None) != (self.lr_rule is None):
            raise ValueError("state: expected an lr_rule state exactly when this accumulator has an lr_rule")
        self.policy.load_state_dict(state["policy"])
        self.estimator.load_state_dict(state["estimator"])
        if self.lr_rule is not None:
            self.lr_rule.load_state_dict(state["lr_rule"])
        self.history = deque((StepRecord(**r) for r in state["history"]), maxlen=self.history.maxlen)
        self.steps = int(state["steps"])
        self._estimates = None

    @property
    def accumulated(self) -> int:
        """Micro-batches accumulated since the last step (non-finite ones included)."""
        return self._launched

    def close(self) -> None:
        """Remove the backward hooks (the accumulator is unusable afterwards)."""
        self._buffers.close()

    # -- internals ------------------------------------------------------------------------------------

    def _apply(self, divisor: float, lr_factor: float) -> None:
        """Hand ``A / divisor`` to the optimizer as ``p.grad``, step, and leave ``A = 0`` and ``G = 0``."""
        buffers = self._buffers
        fold = getattr(self.optimizer, "_step_supports_amp_scaling", False) and all(
            b.grad.dtype == torch.float32 for b in buffers.layout.buffers
        )
        buffers.expose(None if fold else 1.0 / divisor)
        if fold:  # no found_inf: the sum is finite (checked), and torch's fused optimizers then skip a pass
            device = buffers.layout.buffers[0].device
            self.optimizer.grad_scale = torch.full((1,), divisor, device=device)  # as GradScaler's: [1]
        try:
            if lr_factor == 1.0:
                self.optimizer.step()
            else:
                with scaled_lrs(self.optimizer, lr_factor):
                    self.optimizer.step()
        finally:
            if fold:
                del self.optimizer.grad_scale
        buffers.after_step()

    def _optimizer_layout(self) -> FlatLayout | None:
        layout = getattr(self.optimizer, "layout", None)
        if layout is not None and not isinstance(layout, FlatLayout):
            raise TypeError(f"optimizer.layout: expected a FlatLayout, got {type(layout).__name__}")
        return layout

    def _follow_optimizer(self) -> None:
        """Rebuild the buffers when the optimizer's layout object or its param groups changed (checked at
        every call), or its parameters or which of them need a gradient (checked at step boundaries, where
        a package optimizer's ``layout`` also checks its parameters: mid-step its ``built_layout`` is read,
        which skips that per-parameter scan)."""
        opt = self.optimizer
        if self._launched and isinstance(opt, FlatOptimizer):
            layout = opt.built_layout
        else:
            layout = getattr(opt, "layout", None)
        same = layout is self._layout
        if same and layout is None:
            same = len(self.optimizer.param_groups) == self._num_groups
        if not same or (not self._launched and self._params_changed()):
            self._rebuild(self._optimizer_layout())

    def _params_changed(self) -> bool:
        current = self._buffers.layout.params
        if self._layout is None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            if len(params) != len(current) or not all(map(is_, params, current)):
                return True
            if self._buffers.layout.stale() is not None:
                return True
        return tuple(map(_requires_grad, current)) != self._buffers.trainable

    def _rebuild(self, layout: FlatLayout | None) -> None:
        """New buffers over ``layout`` (None: a private layout over the optimizer's groups), carrying the
        current step over from the old ones."""
        groups = self.optimizer.param_groups
        self._shards = self._shard_reducer(groups)
        if self._pending is not None:
            self._resolve()
        self._layout = layout  # the optimizer's layout followed, or None
        self._num_groups = len(groups)
        if layout is None:
            layout = FlatLayout(_named_groups(groups), bind=False)
        # an exact DDP reduction all-reduces G itself: gradients that arrive elsewhere are copied into it
        new = StepBuffers(layout, in_place=self._ddp is None or not self._ddp.exact)
        old, self._buffers = self._buffers, new
        if old is not None:
            new.carry(old)
            old.close()
        rows = [b.num_segments for b in layout.buffers]
        pin = self.read_lag == 1 and any(b.device.type == "cuda" for b in layout.buffers)
        self._host_sums = torch.zeros(sum(rows), 4, dtype=torch.float32, pin_memory=pin)
        self._host_rows = self._host_sums.split(rows)  # per buffer
        self._segments = [(b, j) for b, count in enumerate(rows) for j in range(count)]  # the rows' order
        self._host_scalars = torch.zeros(2, dtype=torch.float32, pin_memory=pin)  # loss, loss scale
        names = [self._names.get(id(p), n) for b in layout.buffers for n, p in zip(b.names, b.owners)]
        self.policy.bind(names)

    def _shard_reducer(self, groups: list[dict]) -> ShardReducer | None:
        """The FSDP2 reductions when the parameters are DTensors (checked: one 1-D mesh, no DDP, no lag)."""
        sharding = Sharding.of(_named_groups(groups))
        if sharding is None:
            return None
        if self._ddp is not None:
            raise TypeError("model: expected no DistributedDataParallel module around FSDP2 parameters")
        if self.read_lag:
            raise ValueError("read_lag: expected 0 under FSDP2 (every rank decides from the reduced sums)")
        return ShardReducer(sharding)

    def _reset_step(self) -> None:
        self._sums = VarianceSums()
        self._acc_sq = 0.0
        self._angles: list[float] = []
        self._loss_sum, self._loss_samples = 0.0, 0
        self._nonfinite = 0
        self._ready = False
        self._acc_empty = True
        self._launched = 0
        self._scale = math.nan if self.scaler is not None else 1.0  # the step's loss scale, once read
        self._estimates: tuple[float, float] | None = None

    def _launch(self, samples: int, loss: torch.Tensor | float | None, fresh: list[Index]) -> None:
        """Run the fused pass on every buffer (into the spare ``A'`` unless ``A = 0``: see
        :meth:`StepBuffers.accumulate`) and start the sums' trip to the host (under DDP: their reduction)."""
        lagged = self.read_lag == 1
        if math.isnan(self._scale):  # the step's first micro-batch under a scaler
            self._host_scalars[1].copy_(amp.loss_scale(self.scaler), non_blocking=lagged)
        if self._shards is not None:
            self._pending = self._launch_sharded(samples, _loss_value(loss), fresh)
        elif self._ddp is None:
            self._pending = self._launch_local(samples, loss, fresh, lagged)
        else:
            self._pending = self._launch_reduced(samples, _loss_value(loss), fresh)
        self._acc_empty = False
        self._launched += 1

    def _launch_local(
        self, samples: int, loss: torch.Tensor | float | None, fresh: list[Index], lagged: bool
    ) -> _Pending:
        """One process: the fused pass, the sums (and a tensor loss) read now or copied for a lagged read."""
        buffers = self._buffers
        sums: list[list[float]] | None = None if lagged else []
        for part, rows in zip(buffers.accumulate(float(samples), self._acc_empty), self._host_rows):
            if lagged:
                rows.copy_(part, non_blocking=True)
            else:
                sums += part.tolist()
        host_loss = lagged and isinstance(loss, torch.Tensor)
        if host_loss:
            self._host_scalars[0].copy_(loss.detach().reshape(()), non_blocking=True)
        events = []
        if lagged:
            for device in dict.fromkeys(b.device for b in buffers.layout.buffers if b.device.type == "cuda"):
                events.append(torch.cuda.Event())
                events[-1].record(torch.cuda.current_stream(device))
        value = math.nan if host_loss else _loss_value(loss)
        return _Pending(samples, sums, value, host_loss, self._acc_empty, fresh, events)

    def _launch_reduced(self, samples: int, loss: float, fresh: list[Index]) -> _Pending:
        """Under DDP: the fused pass between :class:`DDPReducer`'s reductions; everything after is global."""
        ddp, buffers = self._ddp, self._buffers
        if ddp.exact:
            weighted = ddp.reduce_gradient([b.grad for b in buffers.layout.buffers], samples)
            parts = buffers.accumulate(1.0, self._acc_empty)
        else:
            parts = buffers.accumulate(float(samples), self._acc_empty)
            weighted = ddp.local_weighted(parts, samples)
        fresh_set = set(fresh)
        present = torch.tensor([float(index in fresh_set) for index in self._segments])
        sums, counts, weighted, total, loss = ddp.reduce_sums(parts, present, samples, loss, weighted)
        fresh = [index for index, count in zip(self._segments, counts) if count > 0]
        return _Pending(total, sums, loss, False, self._acc_empty, fresh, [], weighted, ddp.world_size)

    def _launch_sharded(self, samples: int, loss: float, fresh: list[Index]) -> _Pending:
        """Under FSDP2: the fused pass ``A + R n G`` on the shards, then one reduction; everything after it
        is global, as for one process on the ranks' micro-batches concatenated."""
        parts = self._buffers.accumulate(float(samples * self._shards.world_size), self._acc_empty)
        fresh_set = set(fresh)
        present = torch.tensor([float(index in fresh_set) for index in self._segments])
        try:
            sums, counts, total, loss = self._shards.reduce_sums(parts, present, samples, loss)
        except ValueError:  # refused on every rank: the micro-batch leaves no trace in A
            self._buffers.roll_back()
            raise
        fresh = [index for index, count in zip(self._segments, counts) if count > 0]
        return _Pending(total, sums, loss, False, self._acc_empty, fresh, [])

    def _reduce_accumulated(self) -> None:
        """Local mode, at the step: ``A <- sum_r A_r`` and ``|A|^2`` of the global sum (one norm pass)."""
        accs = self._buffers.acc
        self._ddp.reduce_accumulated(accs)
        acc_sq = sum(torch.linalg.vector_norm(a).square() for a in accs)
        self._acc_sq = float(acc_sq) / self._scale**2

    def _resolve(self) -> None:
        """Read the pending micro-batch's sums: drop it if non-finite, else record it and ask the policy."""
        pending, self._pending = self._pending, None
        for event in pending.events:
            event.synchronize()
        if math.isnan(self._scale):
            self._scale = self._host_scalars[1].item()
        sums = self._host_sums.tolist() if pending.sums is None else pending.sums
        unscale = self._scale**-2  # every column is quadratic in the gradient
        if unscale != 1.0:
            sums = [[x * unscale for x in row] for row in sums]
        total = column_sums(sums)
        if not (math.isfinite(total[ops.GRAD_SQ]) and math.isfinite(total[ops.ACC_NEW_SQ])):
            self._buffers.roll_back()
            self._acc_empty = pending.from_zero
            self._nonfinite += 1
            logger.warning(
                "non-finite gradient in micro-batch %d of step %d: dropped, accumulated state kept",
                self._sums.micro_batches + self._nonfinite,
                self.steps,
            )
            return
        self._buffers.commit(pending.fresh)
        if self._estimates is None:  # from completed steps: constant within a step
            self._estimates = (self.estimator.trace, self.estimator.noise_scale)
        loss = self._host_scalars[0].item() if pending.host_loss else pending.loss
        if pending.weighted is None:
            self._sums.add(pending.samples, total[ops.GRAD_SQ])
        else:
            self._sums.add_parts(pending.samples, pending.weighted * unscale, pending.parts)
        self._acc_sq = total[ops.ACC_NEW_SQ]
        angle = sums_angle(total)
        if self._sums.micro_batches >= 2:
            self._angles.append(angle)
            self.last_angle = angle
        if math.isfinite(loss):
            self._loss_sum += loss * pending.samples
            self._loss_samples += pending.samples
        obs = Observation(
            micro_batch=self._sums.micro_batches,
            samples=pending.samples,
            total_samples=self._sums.samples,
            sums=sums,
            angle=angle,
            loss=loss,
            lr=_lr_value(self.optimizer.param_groups[0]),
            trace=self._estimates[0],
            noise_scale=self._estimates[1],
        )
        self._ready = self.policy.observe(obs) or self._ready


def _named_groups(groups: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` over param groups: ``param_names`` where the optimizer keeps them."""
    pairs: list[tuple[str, torch.Tensor]] = []
    for g, group in enumerate(groups):
        names = group.get("param_names") or [f"group{g}.param{i}" for i in range(len(group["params"]))]
        pairs.extend(zip(names, group["params"]))
    return pairs


def _loss_value(loss: torch.Tensor | float | None) -> float:
    """The loss as a host float (NaN: none)."""
    if loss is None:
        return math.nan
    return loss.item() if isinstance(loss, torch.Tensor) else float(loss)


def _lr_value(group: dict) -> float:
    lr = group["lr"]
    return lr.item() if isinstance(lr, torch.Tensor) else float(lr)
