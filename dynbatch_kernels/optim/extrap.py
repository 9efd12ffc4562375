"""ExtrapSGD: extrapolated (extragradient) momentum SGD for large batches [Lin20], over flat buffers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch

from dynbatch_kernels import ops
from dynbatch_kernels.layout import FlatBuffer, FlatLayout
from dynbatch_kernels.optim.base import FlatOptimizer, FlatState, check_real, real_value

MODES = ("local", "past")


class ExtrapSGD(FlatOptimizer):
    r"""Extrapolated SGD with Nesterov or heavy-ball momentum: two fused passes per step over flat buffers.

    Per step ``t``, for each param group (``eta = lr``, ``gamma = extrapolation_lr``, ``mu = momentum``,
    ``lam = weight_decay``), with ``w`` the iterate and ``d_t`` the extrapolation direction::

        u_t     = w_t - gamma_t * (d_t + lam * w_t)                  (extrapolate: the model now holds u_t)
        g_t     = grad f(u_t)                                         (the backward at u_t)
        m_{t+1} = mu * m_t + g_t + lam * w_t
        w_{t+1} = w_t - eta_t * (g_t + lam * w_t + mu * m_{t+1})     (Nesterov)
        w_{t+1} = w_t - eta_t * m_{t+1}                               (heavy ball)

    With ``momentum=0`` and ``weight_decay=0`` this is the extragradient step
    ``w <- w - eta * grad f(w - gamma * grad f(w))``.

    Modes (the extrapolation direction ``d_t``):

    - ``"local"`` (EXTRAP-SGD): ``d_t = grad f(w_t)``, the mini-batch gradient at the iterate; two backward
      passes per step::

          opt.zero_grad(); loss_fn(model(x), y).backward()   # gradient at w_t
          opt.extrapolate()                                  # saves w_t, moves to u_t, zeroes the gradient
          loss_fn(model(x2), y2).backward()                  # gradient at u_t (same or a fresh batch)
          opt.step()                                         # restores w_t and applies the update

      or ``opt.step(closure)``: the closure (zero_grad, forward, backward, return the loss) is called at
      ``w_t``, then, after the extrapolation, at ``u_t``; the loss at ``w_t`` is returned. Under data
      parallelism, run the first backward without the all-reduce (``ddp_model.no_sync()``): in [Lin20] the
      extrapolation uses each worker's local gradient and needs no communication; only ``g_t`` is
      averaged.
    - ``"past"``: ``d_t = g_{t-1}``, the gradient of the previous step (taken at ``u_{t-1}``): one backward
      per step. ``step()`` applies the update and extrapolates from ``w_{t+1}`` in the same pass, so between
      steps the model holds ``u_t`` (``u_0 = w_0``). Evaluate or export ``w_t`` inside
      :meth:`swap_to_iterate`. The extrapolation for step ``t+1`` uses the extrapolation lr in effect when
      ``step()`` runs at step ``t`` (an LR scheduler stepping after ``step()`` reaches it one step later).

    Relation to [Lin20] (Lin, Kong, Stich, Jaggi, ICML 2020, arXiv 2006.05720; see
    docs/algorithms.md#extrapolated-sgd): EXTRAP-SGD
    takes a local extrapolation step along each worker's own mini-batch gradient (no communication), and
    applies the all-reduced gradient at the extrapolated points from ``w_t`` with (Nesterov) momentum SGD;
    the unified framework also extrapolates along the previous gradient ("from the past", one gradient per
    step) or along random noise (not offered here; ``ops.extrapolate_`` takes any direction). Momentum
    enters only the update (``d_t`` is a plain gradient). Choices of this implementation: weight decay is L2
    on the iterate, added to both ``d_t`` and ``g_t`` as ``lam * w`` (past mode: ``d_{t+1} = g_t + lam *
    w_{t+1}``); the momentum is float32 whatever the parameter dtype; in past mode the extrapolation lr lags
    the schedule by one step; one process has one worker, so "local" is the step's mini-batch.

    Args:
        params: parameters or param groups (each group may set every hyper-parameter below).
        lr: ``eta >= 0``, the update learning rate (LR schedulers drive ``param_groups[i]["lr"]``).
        momentum: ``mu`` in ``[0, 1)``.
        nesterov: Nesterov momentum (``True``) or heavy ball (``False``).
        weight_decay: ``lam >= 0``, L2 weight decay.
        extrapolation_lr: ``gamma >= 0``; ``None`` follows the group's ``lr`` (and so its schedule).
        mode: ``"local"`` or ``"past"`` (see above).
        maximize: ascend (every gradient negated, the extrapolation direction too), as in torch.optim.
        layout: see :class:`~dynbatch_kernels.optim.base.FlatOptimizer` (a caller's layout to work on; by
            default a private one: ``p.data`` and ``p.grad`` stay the user's).

    State per parameter (views into flat buffers; ``state_dict()["state"][i]``): ``"iterate"``, ``w_t`` in
    the parameter's dtype and shape, the point updates start from (between ``extrapolate()`` and
    ``step()`` in local mode; always in past mode, where the model holds ``u_t``); ``"momentum_buffer"``
    (float32, the parameter's shape); ``"step"`` (float32 scalar, steps taken). ``state_dict()["extrap"]``
    is ``{"mode": ..., "extrapolated": bool}``. Saving the model and this state together (outside
    :meth:`swap_to_iterate`) and loading both into a fresh model and optimizer resumes bit-identically.

    Like a ``torch.optim`` optimizer it leaves ``p.data`` and ``p.grad`` where they are (``extrapolate()``,
    ``step()`` and :meth:`swap_to_iterate` write the parameters in place), skips a parameter whose ``p.grad``
    is ``None`` (in local mode: without a gradient at ``w_t`` it is not moved; without one at ``u_t`` it
    returns to ``w_t``; its momentum and step count stay), follows a device or dtype change of the
    parameters (``model.half()``: the iterate is cast), checks its hyper-parameters at every step, pickles
    and deep-copies. A parameter changed from outside while the model holds ``u`` (past mode, or between
    ``extrapolate()`` and ``step()``) restarts from its new value (its iterate becomes it), unless the
    optimizer state was loaded since: a checkpoint's parameters go with its iterate.

    Differences from torch.optim by design: ``lr`` is required (as in ``torch.optim.SGD`` before 2.2);
    local mode needs two gradients per step (``extrapolate()`` between the backward passes, or a closure
    called twice); ``extrapolate()`` clears the gradients (views of the flat buffer are zeroed, other
    ``p.grad`` set to ``None``); past mode leaves the model at ``u`` between steps; parameters with
    ``requires_grad=False`` are left untouched even with a ``.grad``; the state tensors are views into flat
    buffers; there are no ``foreach`` / ``fused`` / ``capturable`` / ``differentiable`` / ``dampening``
    options; complex parameters are refused. FSDP2 (DTensor) parameters are stepped on their local shards,
    the state sharded like them (see :class:`~dynbatch_kernels.optim.FusedLAMB`). There are no float32
    master weights (the
    iterate is kept in the parameter's dtype: bfloat16 parameters lose updates below their precision), and
    GradScaler takes its ordinary path (it unscales ``p.grad`` in place and skips ``step()`` on overflow),
    which fits past mode; local mode's first gradient would not be unscaled, so use it without GradScaler.
    """

    reads_in_place = True
    state_dtypes: ClassVar[dict[str, torch.dtype | None]] = {
        "iterate": None,
        "momentum_buffer": torch.float32,
    }
    pickled = (*FlatOptimizer.pickled, "mode", "_extrapolated", "_swapped")
    _step_supports_amp_scaling = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        extrapolation_lr: float | None = None,
        mode: str = "local",
        *,
        maximize: bool = False,
        layout: FlatLayout | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self._extrapolated = False
        self._swapped = False
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "extrapolation_lr": extrapolation_lr,
            "maximize": maximize,
        }
        super().__init__(params, defaults, layout=layout, master_weights=False)

    # ---- the algorithm ----

    @torch.no_grad()
    def extrapolate(self) -> None:
        """Local mode: save ``w_t``, move the parameters to ``u_t = w_t - gamma (grad + lam w_t)`` and clear
        the gradients (one fused pass per buffer): after the backward at ``w_t``, before the one at ``u_t``.
        """
        self._check_not_swapped("extrapolate()")
        if self.mode != "local":
            raise RuntimeError(
                "extrapolate(): only for mode='local'; mode='past' extrapolates inside step(), "
                "call step() once per backward"
            )
        if self._extrapolated:
            raise RuntimeError(
                "extrapolate(): already extrapolated; run the backward at the extrapolated point and call "
                "step() before extrapolating again"
            )
        for st in self._prepare():
            buf = st.buffer
            ops.extrapolate_(
                st.params,
                st.tensors["iterate"],
                st.grads,
                buf.offsets,
                st.hyper,
                zero_direction=not st.in_place,  # in place: p.grad = None below, as torch's zero_grad
                chunks=buf.chunks,
            )
            _copy_segments(st.tensors["iterate"], st.params, buf, _skipped(st))  # not moved: u = w
            for j, p in enumerate(buf.owners):  # cleared unless the op zeroed p.grad itself (a bound view)
                if st.groups[j] >= 0 and (st.in_place or not buf.grad_is_view(j)):
                    p.grad = None
        self._extrapolated = True
        self._publish()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply the momentum update from ``w_t`` with the gradient in ``p.grad`` (taken at ``u_t``).

        Local mode needs :meth:`extrapolate` first, or a ``closure`` (then called at ``w_t`` and at ``u_t``).
        Past mode also extrapolates to ``u_{t+1}`` in the same pass. Returns the closure's (first) loss.
        """
        self._check_not_swapped("step()")
        loss = None
        if self.mode == "local" and not self._extrapolated:
            if closure is None:
                raise RuntimeError(
                    "step(): ExtrapSGD(mode='local') needs extrapolate() before step(): backward at w_t, "
                    "extrapolate(), backward at the extrapolated point, then step() (or pass a closure)"
                )
            with torch.enable_grad():
                loss = closure()
            self.extrapolate()
        if closure is not None:
            with torch.enable_grad():
                at_u = closure()
            loss = at_u if loss is None else loss
        for st in self._prepare():
            buf = st.buffer
            ops.extrap_step_(
                st.params,
                st.tensors["iterate"],
                st.grads,
                st.tensors["momentum_buffer"],
                buf.offsets,
                st.hyper,
                extrapolate_next=self.mode == "past",
                chunks=buf.chunks,
            )
            st.step.add_(st.hyper[:, ops.EXTRAP_ACTIVE])
            self._negate_maximized(st)  # the gradient as it was
            if self.mode == "local":
                _copy_segments(st.params, st.tensors["iterate"], buf, _skipped(st))  # back to w
        self._extrapolated = False
        self._publish()
        return loss

    @contextlib.contextmanager
    def swap_to_iterate(self) -> Iterator[None]:
        """Inside the block the parameters hold the iterate ``w_t`` (for evaluation or exporting the model);
        on exit they return to the extrapolated point. No step, extrapolation or optimizer state_dict inside.
        """
        self._check_not_swapped("swap_to_iterate()")
        stash = []
        if self._holds_extrapolated():
            self._gather_params(self._refresh())
            with torch.no_grad():
                for st in self.flat_states:
                    stash.append(torch.empty_like(st.tensors["iterate"]))
                    _copy_segments(stash[-1], st.params, st.buffer, _updated(st))
                    _copy_segments(st.params, st.tensors["iterate"], st.buffer, _updated(st))
            self._publish()
        self._swapped = True
        try:
            yield
        finally:
            with torch.no_grad():
                for st, u in zip(self.flat_states, stash):
                    _copy_segments(st.params, u, st.buffer, _updated(st))
            if stash:
                self._publish()
            self._swapped = False

    # ---- FlatOptimizer hooks and torch.optim.Optimizer API ----

    def hyper_row(self, group: dict[str, Any] | None) -> list[float]:
        if group is None:
            return ops.extrap_hyper_row(lr=0.0, extrapolation_lr=0.0, active=False)
        gamma = group["extrapolation_lr"]
        return ops.extrap_hyper_row(
            lr=real_value(group["lr"]),
            extrapolation_lr=real_value(group["lr"] if gamma is None else gamma),
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            weight_decay=group["weight_decay"],
        )

    def check_group(self, group: dict[str, Any], where: str) -> None:
        """Validate one group's hyper-parameters; errors name the argument, the expectation and the value."""

        def number(name: str, ok: Callable[[float], bool], expected: str) -> None:
            check_real(where, name, group[name], ok, expected)

        number("lr", lambda v: math.isfinite(v) and v >= 0.0, "a finite float >= 0")
        number("momentum", lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
        number("weight_decay", lambda v: math.isfinite(v) and v >= 0.0, "a finite float >= 0")
        if group["extrapolation_lr"] is not None:
            number("extrapolation_lr", lambda v: math.isfinite(v) and v >= 0.0, "None or a finite float >= 0")
        for flag in ("nesterov", "maximize"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"{where}{flag}: expected a bool, got {group[flag]!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`FlatOptimizer.add_param_group`; the new parameters' iterate starts at their values."""
        if self._extrapolated or self._swapped:
            raise RuntimeError(
                "add_param_group: not between extrapolate() and step(), nor in swap_to_iterate()"
            )
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        self._check_not_swapped("state_dict()")
        out = super().state_dict()
        out["extrap"] = {"mode": self.mode, "extrapolated": self._extrapolated}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of the same mode (checked first, then as :class:`FlatOptimizer`)."""
        self._check_not_swapped("load_state_dict()")
        extra = state_dict.get("extrap")
        if not isinstance(extra, dict) or extra.get("mode") != self.mode:
            got = extra.get("mode") if isinstance(extra, dict) else "no 'extrap' entry"
            raise ValueError(f"state_dict: expected an ExtrapSGD state of mode {self.mode!r}, got {got!r}")
        super().load_state_dict(state_dict)
        self._extrapolated = bool(extra["extrapolated"])

    def __getstate__(self) -> dict[str, Any]:
        self._check_not_swapped("pickling or copy.deepcopy")
        return super().__getstate__()

    def _follow(self, st: FlatState, moved: list[int]) -> None:
        """While the model holds ``u``, a parameter changed from outside becomes its iterate (unless the state
        was just loaded: the checkpoint's parameters go with its iterate)."""
        if self._holds_extrapolated() and not self._loaded:
            ours = [j for j in moved if st.groups[j] >= 0]
            _copy_segments(st.tensors["iterate"], st.params, st.buffer, ours)

    def _holds_extrapolated(self) -> bool:
        """Whether the parameters hold ``u`` (and the iterate ``w`` is the optimizer's)."""
        return self.mode == "past" or self._extrapolated

    def _new_state(self, buf: FlatBuffer, group_of: dict[int, int]) -> FlatState:
        st = super()._new_state(buf, group_of)
        st.tensors["iterate"].copy_(buf.data)  # w_0 (past mode: u_0 = w_0); kept parameters get theirs back
        return st

    def _check_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"{what}: not allowed inside swap_to_iterate(); leave the block first")


def _updated(st: FlatState) -> list[int]:
    """Segments the optimizer updates: its parameters that require a gradient."""
    return [j for j, (g, p) in enumerate(zip(st.groups, st.buffer.owners)) if g >= 0 and p.requires_grad]


def _skipped(st: FlatState) -> list[int]:
    """Segments the optimizer updates but left untouched in the last call (no gradient)."""
    return [j for j in _updated(st) if st.index[j] < 0]


Operand = torch.Tensor | list[torch.Tensor]


def _copy_segments(dst: Operand, src: Operand, buf: FlatBuffer, segments: list[int]) -> None:
    """``dst <- src`` over ``segments``; each a flat buffer laid out like ``buf`` or a tensor per segment."""
    if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor) and len(segments) == buf.num_segments:
        dst.copy_(src)
    elif segments:
        pairs = [(_segment(dst, buf, j), _segment(src, buf, j)) for j in segments]
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def _segment(x: Operand, buf: FlatBuffer, j: int) -> torch.Tensor:
    if isinstance(x, list):
        return x[j].detach().view(-1)
    lo, hi = buf.bounds[j]
    return x[lo:hi]
