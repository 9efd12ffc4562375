"""FusedLAMB: LAMB and LAMBC (trust-ratio clipping) in two fused passes over flat buffers [You19, Fong20]."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from dynbatch_kernels import ops
from dynbatch_kernels.layout import FlatLayout
from dynbatch_kernels.optim.base import FlatOptimizer, FlatState, check_real


class FusedLAMB(FlatOptimizer):
    r"""LAMB with optional trust-ratio clipping (LAMBC), every option per param group.

    Per step ``t``, per parameter tensor ``j`` of a group (``lr, (beta1, beta2), eps, wd``), with ``g`` the
    unscaled gradient::

        (max_grad_norm) g <- g / max(1, |g|_global / max_grad_norm)
        m <- beta1*m + (1-beta1)*g ;  v <- beta2*v + (1-beta2)*g^2
        u  = (m / (1-beta1^t)) / (sqrt(v / (1-beta2^t)) + eps) + wd*w    (no 1-beta^t without bias_correction)
        r_j = |w|_j / |u|_j, or 1 where |w|_j or |u|_j is 0
        r_j <- clip(r_j, r_min, r_max)                                  (trust_clip=(r_min, r_max))
        w <- w - lr * r_j * u

    Groups with ``weight_decay == 0`` (biases, norms) use ``r_j = 1`` unless ``always_adapt``, as in apex
    and timm. ``trust_clip=(0.0, 1.0)`` is timm's LAMBC; DeepSpeed clamps to ``(0.01, 10.0)``.

    Each step is :func:`~dynbatch_kernels.ops.lamb_step_` once per layout buffer: two passes, 40 bytes per
    float32 element (36 for bfloat16 with a master copy). With ``max_grad_norm`` in any group the global
    norm of the whole optimizer's unscaled gradient is needed first: pass it as ``step(grad_sq_norm=...)``
    (``|g|^2``, e.g. summed from :func:`~dynbatch_kernels.ops.accumulate_`'s statistics) or one read-only
    pass measures it (+4 bytes per float32 element). A non-finite norm skips the step like an overflow.

    Args:
        params: parameters or param groups; each group may set every option below.
        lr: learning rate (>= 0); LR schedulers drive ``param_groups[i]["lr"]``.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(v_hat)`` (>= 0).
        weight_decay: ``wd >= 0``, added to the update (``u += wd * w``, as apex and timm).
        trust_clip: ``None`` (plain LAMB) or ``(r_min, r_max)`` with ``0 <= r_min <= r_max``.
        always_adapt: apply the trust ratio in groups with ``weight_decay == 0`` too.
        max_grad_norm: clip the gradient by its global norm (``None``: no clipping).
        bias_correction: divide by ``1 - beta^t``.
        maximize: ascend (the gradient negated), as in torch.optim.
        layout, master_weights: see :class:`~dynbatch_kernels.optim.base.FlatOptimizer`. bfloat16/float16
            parameters get a float32 master copy by default.
        grad_norm_group: when each rank of this process group steps a disjoint part of the model
            (``torch.distributed.optim.ZeroRedundancyOptimizer(params, optimizer_class=FusedLAMB, ...,
            grad_norm_group=group)``), ``max_grad_norm`` clips by the norm over every part: ``|g|^2`` is
            summed over the group (one all-reduce of one float per step, on the device). Trust ratios need
            nothing: each tensor is whole on one rank. Not carried by pickling or ``copy.deepcopy``.
            Not needed (and refused) with FSDP2 parameters, whose sums go over their mesh by themselves.

    FSDP2 (``fully_shard``: DTensor parameters, every one on one mesh, sharded along one mesh dimension):
    each rank steps its local shards where FSDP2 keeps them, with the state sharded the same way
    (``state[p]`` holds DTensors like ``p``, which ``torch.distributed.checkpoint`` saves and reshards).
    The step is :func:`~dynbatch_kernels.ops.lamb_update_` on every buffer, one all-reduce of the
    ``[S, 3]`` partial ``|w|^2, |u|^2, |g|^2`` over the shard group, then
    :func:`~dynbatch_kernels.ops.lamb_apply_` with the whole tensors' ratios: the same step as one process
    holding whole tensors; ``max_grad_norm`` sums ``|g|^2`` over the shards likewise.

    State per parameter (views into flat buffers; ``state_dict()["state"][i]``): ``"step"`` (float32
    scalar), ``"exp_avg"`` and ``"exp_avg_sq"`` (float32, the parameter's shape), and ``"master_param"``
    (float32) for bfloat16/float16 parameters. ``state_dict()`` / ``load_state_dict()`` round-trip
    exactly, also into a fresh model: resuming gives bit-identical parameters.

    GradScaler: ``_step_supports_amp_scaling``; the scaler's inverse scale is applied inside pass 1 and its
    ``found_inf`` skips the step on the device with everything untouched (no host synchronisation).
    ``last_stats`` / :attr:`last_trust_ratios` give the ratios of the last step for logging.

    Like a ``torch.optim`` optimizer it leaves ``p.data`` and ``p.grad`` where they are (its kernels read
    and write them in place; state in a private flat layout, see
    :class:`~dynbatch_kernels.optim.base.FlatOptimizer`),
    skips parameters whose ``p.grad`` is ``None``, follows parameters changed from outside (``p.data =``,
    ``model.load_state_dict``, ``model.half()``), checks its hyper-parameters at every step, pickles and
    deep-copies. ``zero_grad()`` is torch's.

    Differences from timm's ``Lamb`` (checked against it in the tests) and apex's ``FusedLAMB``:
    ``trust_clip`` is a range, not timm's flag (timm's ``True`` is ``(0.0, 1.0)``), and where ``|w|`` or
    ``|u|`` is 0 the ratio is 1, unclipped; ``max_grad_norm`` defaults to ``None`` (timm and apex: 1.0) and
    is read per group (both read it from the defaults), the norm itself staying global; the step count is
    kept per parameter and advanced only when the parameter has a gradient (timm: per group, counting
    steps where the group had no gradient); ``always_adapt`` is apex's ``use_nvlamb``.

    Differences from torch.optim by design: a parameter with ``requires_grad=False`` is left untouched even
    if it has a ``.grad``; bfloat16/float16 parameters get float32 master weights, so an in-place write
    through ``p.data`` (which torch does not version) needs :meth:`sync_master_weights`; the state tensors
    are views into flat buffers and ``load_state_dict`` copies values without casting; there are no
    ``foreach`` / ``fused`` / ``capturable`` / ``differentiable`` options (one fused pass per buffer; ``lr``
    is a float or a CPU scalar tensor); complex parameters and FSDP1's flat parameters are refused.

    The trust ratio comes from float32 partial sums added per segment in float64. Pass 1 writes the update
    ``u`` into the flat gradient buffer (pass 2 reads it from there; for bfloat16 gradients ``u`` is held
    in bfloat16, a relative rounding of at most 2**-8 per update): a private copy, where the C++ kernels
    keep the ``u`` of tensors small enough, and of the end of each thread's part of larger ones, in a
    cache-sized scratch instead (see :func:`~dynbatch_kernels.ops.lamb_step_`), unless ``p.grad`` is the
    flat buffer's view (a caller's ``bind=True`` layout, or gradients bound to it): then ``p.grad`` holds
    ``u`` after ``step()``.
    """

    reads_in_place = True
    state_dtypes: ClassVar[dict[str, torch.dtype | None]] = {
        "exp_avg": torch.float32,
        "exp_avg_sq": torch.float32,
    }
    pickled = (*FlatOptimizer.pickled, "last_stats", "last_grad_sq_norm")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        trust_clip: tuple[float, float] | None = None,
        always_adapt: bool = False,
        max_grad_norm: float | None = None,
        bias_correction: bool = True,
        *,
        maximize: bool = False,
        layout: FlatLayout | None = None,
        master_weights: bool | None = None,
        grad_norm_group: dist.ProcessGroup | None = None,
    ):
        if grad_norm_group is not None and not isinstance(grad_norm_group, dist.ProcessGroup):
            raise TypeError(f"grad_norm_group: expected a ProcessGroup or None, got {grad_norm_group!r}")
        self.grad_norm_group = grad_norm_group
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "max_grad_norm": max_grad_norm,
            "bias_correction": bias_correction,
            "maximize": maximize,
        }
        self.last_stats: list[torch.Tensor] = []
        self.last_grad_sq_norm: torch.Tensor | None = None
        super().__init__(params, defaults, layout=layout, master_weights=master_weights)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.grad_norm_group = None  # a process group does not pickle: a copy clips by its own part

    @torch.no_grad()
    def step(
        self, closure: Callable[[], torch.Tensor] | None = None, *, grad_sq_norm: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """One LAMB step on the gradients in ``p.grad`` (after the closure); returns the closure's loss.

        Args:
            closure: re-evaluates the model and returns the loss (called with gradients enabled).
            grad_sq_norm: ``|g|^2`` of the whole unscaled gradient (over every rank's part when the model is
                partitioned), already known from an earlier reduction:
                replaces the read-only pass that ``max_grad_norm`` needs otherwise (one-element float32).
        """
        if self.grad_norm_group is not None and self.sharding is not None:
            raise ValueError(
                "grad_norm_group: expected None with DTensor (FSDP2) parameters, whose norms are summed over "
                "their device mesh"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        states = self._prepare()
        amp = {st.buffer.device: self._amp_scalars(st.buffer.device) for st in states}
        if grad_sq_norm is None and any(group["max_grad_norm"] is not None for group in self.param_groups):
            norms = [
                ops.lamb_grad_sq_norm(
                    st.grads,
                    st.buffer.offsets,
                    st.hyper,
                    inv_grad_scale=amp[st.buffer.device][0],
                    chunks=st.buffer.chunks,
                )
                for st in states
            ]
            grad_sq_norm = sum(norm.to(norms[0].device) for norm in norms[1:]) + norms[0]
            if self.grad_norm_group is not None:  # this rank's part of the model: sum over the parts
                dist.all_reduce(grad_sq_norm, group=self.grad_norm_group)
            elif self.sharding is not None:  # this rank's shards: sum over the shards
                self.sharding.sum_scalar(grad_sq_norm)
        self.last_grad_sq_norm = grad_sq_norm
        calls = [self._call_args(st, grad_sq_norm, *amp[st.buffer.device]) for st in states]
        if self.sharding is None:
            self.last_stats = [ops.lamb_step_(*args, **pass1, **both) for args, pass1, both in calls]
        else:  # per-tensor norms of this rank's shards, summed over the shards, then the exact ratios
            self.last_stats = [ops.lamb_update_(*args, **pass1, **both) for args, pass1, both in calls]
            self.sharding.sum_over_shards([stats[:, : ops.LAMB_RATIO] for stats in self.last_stats])
            for st, (_, _, both), stats in zip(states, calls, self.last_stats):
                ops.lamb_apply_(st.params, st.buffer.grad, st.buffer.offsets, stats=stats, **both)
        self._publish()
        return loss

    @staticmethod
    def _call_args(
        st: FlatState,
        grad_sq_norm: torch.Tensor | None,
        inv_grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> tuple[tuple, dict[str, Any], dict[str, Any]]:
        """The arguments of one buffer's step: positional, pass 1's own keywords, those of both passes.
        ``u`` goes into the private gradient buffer ``st.buffer.grad``: as ``update`` when the ops read
        ``p.grad`` in place, else as ``st.grads`` (that buffer then)."""
        buf = st.buffer
        args = (st.params, st.grads, st.tensors["exp_avg"], st.tensors["exp_avg_sq"], buf.offsets)
        pass1 = {"update": buf.grad if st.in_place else None, "inv_grad_scale": inv_grad_scale}
        both = {
            "hyper": st.hyper,
            "step": st.step,
            "master": st.master,
            "grad_sq_norm": None if grad_sq_norm is None else grad_sq_norm.to(buf.device),
            "found_inf": found_inf,
            "chunks": buf.chunks,
        }
        return args, pass1, both

    @property
    def last_trust_ratios(self) -> torch.Tensor | None:
        """The trust ratio of every segment in the last step (layout order, all buffers; 1 where not
        adapted), on the first buffer's device; None before the first step. No host synchronisation."""
        if not self.last_stats:
            return None
        device = self.last_stats[0].device
        return torch.cat([stats[:, ops.LAMB_RATIO].to(device) for stats in self.last_stats])

    def named_trust_ratios(self) -> dict[str, float]:
        """``{parameter name: trust ratio}`` of the last step for this optimizer's parameters (reads them
        back to the host: for logging)."""
        out = {}
        for st, stats in zip(self.flat_states, self.last_stats):
            ratios = stats[:, ops.LAMB_RATIO].tolist()
            out.update((name, r) for name, g, r in zip(st.buffer.names, st.groups, ratios) if g >= 0)
        return out

    def hyper_row(self, group: dict[str, Any] | None) -> list[float]:
        if group is None:
            return ops.lamb_hyper_row(lr=0.0, active=False)
        return ops.lamb_hyper_row(
            lr=float(group["lr"]),
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            trust_clip=group["trust_clip"],
            always_adapt=group["always_adapt"],
            bias_correction=group["bias_correction"],
            max_grad_norm=group["max_grad_norm"],
        )

    def check_group(self, group: dict[str, Any], where: str) -> None:
        """Validate one group's options; errors name the option, what was expected and what was given."""

        def real(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
            check_real(where, name, value, ok, expected)

        def flag(name: str) -> None:
            if not isinstance(group[name], bool):
                raise TypeError(f"{where}{name}: expected a bool, got {group[name]!r}")

        def pair(name: str) -> tuple[Any, Any]:
            value = group[name]
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"{where}{name}: expected a pair of floats, got {value!r}")
            return value[0], value[1]

        real(
            "lr",
            group["lr"],
            lambda v: math.isfinite(v) and v >= 0,
            "a finite float >= 0 (or a CPU scalar tensor)",
        )
        for k, beta in enumerate(pair("betas")):
            real(f"betas[{k}]", beta, lambda v: 0 <= v < 1, "a float in [0, 1)")
        real("eps", group["eps"], lambda v: math.isfinite(v) and v >= 0, "a finite float >= 0")
        real(
            "weight_decay",
            group["weight_decay"],
            lambda v: math.isfinite(v) and v >= 0,
            "a finite float >= 0",
        )
        if group["trust_clip"] is not None:
            r_min, r_max = pair("trust_clip")
            real("trust_clip[0]", r_min, lambda v: math.isfinite(v) and v >= 0, "r_min: a finite float >= 0")
            real("trust_clip[1]", r_max, lambda v: v >= float(r_min), f"r_max >= r_min = {r_min!r}")
        if group["max_grad_norm"] is not None:
            real("max_grad_norm", group["max_grad_norm"], lambda v: v > 0, "None or a float > 0")
        flag("always_adapt")
        flag("bias_correction")
        flag("maximize")
