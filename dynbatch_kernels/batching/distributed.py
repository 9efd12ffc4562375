"""The accumulator's communication under ``DistributedDataParallel`` (:class:`DDPReducer`) and FSDP2
(:class:`ShardReducer`): every decision from reduced values.

The accumulator turns DDP's own gradient all-reduce off (``require_backward_grad_sync = False``, what
``no_sync()`` does) and reduces, with ``torch.distributed`` SUM all-reduces over the DDP module's process
group, what it needs. Rank ``r``'s micro-batch ``k`` has ``n_r`` samples and mean gradient ``g_r``::

    exact:  G <- n_r g_r, all-reduce(G)     every micro-batch: A += sum_r n_r g_r, identical on every rank
    local:  A_r += n_r g_r                  no gradient traffic until the step: all-reduce(A) once
    both:   all-reduce [the [S, 4] sums | one presence flag per segment | n_r |g_r|^2 | n_r | n_r L_r]

so the policy sees global sample counts ``N_k = sum_r n_r``, the sample-weighted loss and sums that are
the same on every rank. A non-finite gradient on any rank makes the reduced sums non-finite on every rank
(the squared columns are sums of non-negative terms), so every rank drops the micro-batch. In the local
mode the reduced sums give the pooled within-rank angle (``sum_r A_r.A_r' / sqrt(sum_r |A_r|^2 sum_r
|A_r'|^2)``); in the exact mode the angle of the global accumulated gradient. ``n_r |g_r|^2`` (one norm
pass over ``G`` in the exact mode, the local sums in the local mode) makes each rank's micro-batch a part
of the noise-scale estimate (:class:`~dynbatch_kernels.batching.estimators.VarianceSums`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dynbatch_kernels.ops import GRAD_SQ
from dynbatch_kernels.sharding import Sharding

#: The two ways to reduce gradients (see the module docstring).
MODES = ("local", "exact")


class DDPReducer:
    """The reductions of one accumulator over a DDP module's process group."""

    def __init__(self, model: DistributedDataParallel, mode: str):
        if mode not in MODES:
            raise ValueError(f"ddp_sync: expected one of {MODES}, got {mode!r}")
        self.model, self.exact = model, mode == "exact"
        self.group = model.process_group
        self.world_size = dist.get_world_size(self.group)
        model.require_backward_grad_sync = False  # the accumulator all-reduces; DDP must not average

    def check_unsynced(self) -> None:
        """Fail when DDP averaged ``p.grad`` itself (the flag was turned back on after construction)."""
        if self.model.require_backward_grad_sync:
            raise RuntimeError(
                "ddp_sync: expected DDP's gradient sync off (require_backward_grad_sync=False, set by the "
                "accumulator), got it on: DDP averaged this backward; do not set it back"
            )

    def reduce_gradient(self, grads: list[torch.Tensor], samples: int) -> torch.Tensor:
        """Exact mode, before the fused pass: ``G <- sum_r n_r g_r``; returns the local ``n_r |g_r|^2``."""
        weighted = sum(torch.linalg.vector_norm(g, dtype=torch.float32).square() for g in grads) * samples
        for g in grads:
            g.mul_(samples)
            self._all_reduce(g)
        return weighted

    def reduce_sums(
        self,
        parts: list[torch.Tensor],
        present: torch.Tensor,
        samples: int,
        loss: float,
        weighted: torch.Tensor,
    ) -> tuple[list[list[float]], list[float], float, int, float]:
        """One all-reduce of ``[sums | present | n_r |g_r|^2 | n_r | n_r L_r]`` (the sums only in the local
        mode: in the exact mode they are global already); returns the global sums, the per-segment
        presence counts, ``sum_r n_r |g_r|^2``, ``N_k`` and the sample-weighted loss."""
        tail = [weighted, samples, samples * loss]
        sums, counts, (weighted_sum, total, loss_sum) = _reduce_rows(
            parts, present, tail, self.group, self.world_size, with_sums=not self.exact
        )
        return sums, counts, weighted_sum, round(total), loss_sum / total

    def reduce_accumulated(self, accs: list[torch.Tensor]) -> None:
        """Local mode, at the step: ``A <- sum_r A_r`` (one all-reduce per flat buffer)."""
        for acc in accs:
            self._all_reduce(acc)

    def local_weighted(self, parts: list[torch.Tensor], samples: int) -> torch.Tensor:
        """Local mode: ``n_r |g_r|^2 = sum_segments GRAD_SQ / n_r`` from this rank's sums (on the device)."""
        return sum(part[:, GRAD_SQ].sum() for part in parts) / samples

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        _all_reduce(tensor, self.group, self.world_size)


def _reduce_rows(
    parts: list[torch.Tensor],
    present: torch.Tensor,
    tail: list[float | torch.Tensor],
    group: dist.ProcessGroup,
    world_size: int,
    with_sums: bool = True,
) -> tuple[list[list[float]], list[float], list[float]]:
    """One float64 SUM all-reduce of ``[the [S, 4] sums (with_sums) | present | tail]``; returns the sums
    (this rank's own without ``with_sums``), the per-segment presence counts and the tail, on the host."""
    rows = torch.cat(parts).double()
    device, segments = rows.device, len(rows)
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in tail])
    payload = torch.cat([present.to(device, torch.float64), values])
    if with_sums:
        payload = torch.cat([rows.reshape(-1), payload])
    _all_reduce(payload, group, world_size)
    reduced = payload.tolist()
    if with_sums:
        sums = [reduced[4 * j : 4 * j + 4] for j in range(segments)]
        reduced = reduced[4 * segments :]
    else:
        sums = rows.tolist()
    return sums, reduced[:segments], reduced[segments:]


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, world_size: int) -> None:
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as exc:
        raise RuntimeError(
            f"GradientAccumulator: an all-reduce over {world_size} ranks failed: a rank stopped "
            f"early, crashed or took longer than the process group's timeout ({exc})"
        ) from exc


class ShardReducer:
    """The reductions of one accumulator over FSDP2 parameters (``fully_shard`` on a 1-D mesh).

    FSDP2 reduce-scatters every backward's gradient: rank ``r`` holds its shard of the mean over ranks
    ``G = (1/R) sum_r g_r``, which is the batch mean when every rank's micro-batch has the same ``n``
    samples (checked). The fused pass ``A += R n G`` on the shards and one all-reduce of ``[the shards'
    [S, 4] sums | presence | n_r | n_r^2 | n_r L_r]`` give the whole tensors' sums, the global count and
    loss on every rank: the accumulator then sees what one process sees on the ranks' micro-batches
    concatenated (the angle of the global accumulated gradient, as the exact DDP mode).
    """

    def __init__(self, sharding: Sharding):
        if sharding.mesh.ndim != 1:
            raise ValueError(
                f"optimizer: FSDP2 parameters on a {sharding.mesh.ndim}-D mesh; the gradient accumulator "
                "takes a 1-D mesh (fully_shard without replication)"
            )
        self.group = sharding.group
        self.world_size = dist.get_world_size(self.group)

    def reduce_sums(
        self, parts: list[torch.Tensor], present: torch.Tensor, samples: int, loss: float
    ) -> tuple[list[list[float]], list[float], int, float]:
        """One all-reduce; returns the whole tensors' sums, the per-segment presence counts, ``N_k`` and
        the sample-weighted loss. Raises (on every rank alike) when the ranks' micro-batch sizes differ."""
        tail = [samples, samples**2, samples * loss]
        sums, presence, (total, squares, loss_sum) = _reduce_rows(
            parts, present, tail, self.group, self.world_size
        )
        if squares * self.world_size != total**2:
            raise ValueError(
                f"num_samples: expected the same micro-batch size on every rank under FSDP2, which averages "
                f"the ranks' gradients with equal weights; got {round(total)} samples over "
                f"{self.world_size} ranks, unevenly. The micro-batch was not accumulated and its gradient "
                "is used up: run its backward again with equal sizes"
            )
        return sums, presence, round(total), loss_sum / total
