"""The accumulator's buffers over a :class:`~dynbatch_kernels.FlatLayout`, and what it does to ``p.grad``.

Per layout buffer: ``G`` (the buffer's ``.grad``, where micro-batch gradients are gathered), the float32
sum ``A`` and its spare ``A'`` (allocated at the first micro-batch that needs it). A micro-batch after the
step's first writes ``A + s G`` into ``A'`` and leaves ``A`` as it was: accepting it swaps the two, dropping
it (a non-finite gradient) keeps ``A``, exactly and without a backup copy.

``p.grad`` across micro-batches: after each micro-batch every non-None ``p.grad`` is pointed at its
(zeroed) segment view of ``G`` so the next backward writes straight into it (the fast path: nothing to
copy, one identity check per parameter). A gradient that replaced one (``zero_grad(set_to_none=True)``
then a backward, a closure assigning ``p.grad``) is read where it lives by the fused pass, which zeroes
it, and ``p.grad`` is pointed back at the view; it is copied into ``G`` first only when it is not
contiguous, or under an exact DDP reduction (which all-reduces ``G`` itself). A ``None`` gradient stays
``None``.

Which parameters took part in a step: those whose post-accumulate-grad hook fired (a backward reached
them) or whose ``p.grad`` was a tensor of the user's, in an accepted micro-batch. A parameter that took
part in none gets ``p.grad = None`` at the step (torch optimizers skip it: no update, no weight decay);
the hooks also tell whether a backward happened at all.

FSDP2 (a buffer of DTensor parameters' local shards): FSDP2 reduce-scatters each backward's gradient into
``p.grad`` (a DTensor), adding to the one there. The fused pass reads every local shard where it lives and
zeroes it, so the next backward adds into zeros; ``p.grad`` stays the DTensor FSDP2 made. At the step the
shards get ``A * scale`` (a copy), and after it zeros again.
"""

from __future__ import annotations

from operator import attrgetter, is_

import torch

from dynbatch_kernels.backends import backend_module
from dynbatch_kernels.checks import GRAD_DTYPES, check_flat, check_same, table_for
from dynbatch_kernels.layout import FlatBuffer, FlatLayout
from dynbatch_kernels.sharding import local_tensor

_grad = attrgetter("grad")  # p.grad, for loops that run in C (map) without a Python frame per parameter

Index = tuple[int, int]  # (buffer, segment)


class StepBuffers:
    """``A``, ``A'``, the ``p.grad`` views and the per-step participation of one layout's parameters."""

    def __init__(self, layout: FlatLayout, in_place: bool = True):
        self.layout = layout
        #: The fused pass reads a gradient that is not our view where it lives (else: copied into ``G``).
        self.in_place = in_place
        self._operands: list[list[torch.Tensor] | None] = [None] * len(layout.buffers)
        buffers = layout.buffers
        self.acc = [torch.zeros(b.grad.numel(), dtype=torch.float32, device=b.device) for b in buffers]
        for acc, b in zip(self.acc, buffers):  # what ops.accumulate_ checks at every call, once
            check_flat("grad", b.grad, GRAD_DTYPES)
            check_same("grad", b.grad, "acc", acc)
            table_for(b.offsets, [("acc", acc, [acc]), ("grad", b.grad, [b.grad])], b.chunks)
        self._kernels = [backend_module(b.device).accumulate_ for b in buffers]
        self.spare: list[torch.Tensor] = []
        self._in_spare = False  # the last fused pass wrote into the spares: A still holds the sum before it
        self.hits: list[torch.Tensor] = []  # parameters reached by a backward since the last gather
        self.hooks = [
            p.register_post_accumulate_grad_hook(self.hits.append) for p in layout.params if p.requires_grad
        ]
        self.trainable = tuple(p.requires_grad for p in layout.params)
        self._grads = [b.grad for b in buffers]  # the G each view list belongs to
        self._views = [b.segment_views(b.grad) for b in buffers]
        # the segment views of G, A and the spare, by storage: the three trade roles
        self._known_views: list[dict[int, list[torch.Tensor]]] = [{} for _ in buffers]
        self._bound: list[list[torch.Tensor | None]] = [[None] * b.num_segments for b in buffers]
        self.present = [[False] * b.num_segments for b in buffers]
        self.missing = len(layout.params)  # parameters not (yet) present in this step

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    # -- per micro-batch ------------------------------------------------------------------------------

    def gather(self) -> list[Index] | None:
        """Make ``G`` hold this micro-batch's gradient and point ``p.grad`` at ``G``'s views; return the
        parameters that took part for the first time in this step, or None when no gradient arrived."""
        fresh: list[Index] = []
        arrived = bool(self.hits)
        for b, buf in enumerate(self.layout.buffers):
            if buf.grad is not self._grads[b]:  # G replaced by the layout's owner: move our views over
                self._grads[b], self._views[b] = buf.grad, buf.segment_views(buf.grad)
                for j in range(buf.num_segments):
                    self._move_bound(b, j, self, b, j)
            if buf.sharded:
                self._operands[b] = self._shard_operand(b, buf)
                continue
            bound = self._bound[b]
            if all(map(is_, map(_grad, buf.params), bound)):  # C-level loops: no frame per parameter
                continue
            views, present = self._views[b], self.present[b]
            stale: list[torch.Tensor] = []
            if self.in_place:
                operand = self._operands[b] = list(views)
            else:
                buf.gather_grads()
            for j, p in enumerate(buf.params):
                g = p.grad
                if g is None or g is bound[j]:
                    if g is None and bound[j] is not None and self.in_place:
                        views[j].zero_()  # cleared after a backward wrote into our view
                    bound[j] = g
                    continue
                arrived = True
                if not present[j]:
                    fresh.append((b, j))
                if self.in_place:  # read where it lives by the fused pass (which zeroes it)
                    if bound[j] is not None:
                        stale.append(views[j])  # a backward may have written into it before the swap
                    operand[j] = g if g.is_contiguous() else views[j].copy_(g)
                p.grad = bound[j] = views[j]
            if stale:
                torch._foreach_zero_(stale)
        if self.missing:
            fresh.extend(self.layout.locate(p) for p in self.hits if p.grad is not None)
        self.hits.clear()
        return fresh if arrived else None

    def _shard_operand(self, b: int, buf: FlatBuffer) -> list[torch.Tensor]:
        """The fused pass's gradient operand of a buffer of local shards: every ``p.grad``'s shard where it
        lives (a non-contiguous one copied into ``G`` and zeroed), ``G``'s zero view where there is none."""
        operand = list(self._views[b])
        for j, g in enumerate(buf.grads()):
            if g is not None:
                if g.is_contiguous():
                    operand[j] = g
                else:
                    operand[j].copy_(g)
                    g.zero_()
        return operand

    def accumulate(self, scale: float, from_zero: bool) -> list[torch.Tensor]:
        """The fused pass :func:`~dynbatch_kernels.ops.accumulate_` on every buffer, ``A + scale * G`` and
        ``G <- 0``, straight into the backend chosen at construction (the op's per-call checks and dispatch
        cost more host time than the pass on a small model); returns each buffer's ``[S_b, 4]`` sums. The
        sum goes into ``A`` when it is the step's first (``from_zero``: ``A = 0``), else into the spare
        ``A'`` (:meth:`commit` swaps them, :meth:`roll_back` keeps ``A``). With :attr:`in_place`, ``G``'s
        segments whose gradient arrived elsewhere are read (and zeroed) there.
        """
        if not from_zero and not self.spare:
            self.spare = [torch.zeros_like(a) for a in self.acc]  # zero padding: never written
        sums = []
        for b, (kernel, acc, buf) in enumerate(zip(self._kernels, self.acc, self.layout.buffers)):
            out = None if from_zero else [self.spare[b]]
            sums.append(kernel([acc], self._operands[b] or [buf.grad], buf.chunks, scale, True, out))
            self._operands[b] = None
        self._in_spare = not from_zero
        return sums

    def roll_back(self) -> None:
        """Undo the last fused pass: ``A`` as it was before (zeroed when that pass was the step's first;
        else it was never written)."""
        if not self._in_spare:
            for acc in self.acc:
                acc.zero_()
        self._in_spare = False

    def commit(self, fresh: list[Index]) -> None:
        """Accept the last fused pass (its sum becomes ``A``) and mark the parameters of its micro-batch
        as taking part in the step."""
        if self._in_spare:
            self.acc, self.spare = self.spare, self.acc
            self._in_spare = False
        for b, j in fresh:
            if not self.present[b][j]:
                self.present[b][j] = True
                self.missing -= 1

    # -- per step -------------------------------------------------------------------------------------

    def expose(self, scale: float | None) -> None:
        """Put the step's gradient ``A * scale`` in ``p.grad`` (``scale=None``: ``A`` as is; every buffer
        float32), ``None`` for parameters that took part in no micro-batch.

        A float32 buffer swaps ``A`` and ``G`` (``G`` is zero after the last fused pass and becomes the next
        ``A``; ``A`` is scaled in place and becomes ``G``, read through the ``p.grad`` views); any other
        buffer gets ``G <- A * scale`` and ``A <- 0``.
        """
        for b, buf in enumerate(self.layout.buffers):
            acc = self.acc[b]
            if buf.sharded:
                self._expose_shards(b, buf, scale)
                continue
            if buf.grad.dtype == torch.float32:
                if scale is not None and scale != 1.0:
                    acc.mul_(scale)
                known = self._known_views[b]
                known[self._grads[b].data_ptr()] = self._views[b]
                if acc.data_ptr() not in known:
                    known[acc.data_ptr()] = buf.segment_views(acc)
                self._views[b] = known[acc.data_ptr()]
                self.acc[b], buf.grad = buf.grad, acc
                self._grads[b] = acc
            else:
                torch.mul(acc, scale, out=buf.grad)
                acc.zero_()
            bound, views = self._bound[b], self._views[b]
            for j, (p, present) in enumerate(zip(buf.params, self.present[b])):
                want = views[j] if present else None
                if p.grad is not want:
                    p.grad = want
                bound[j] = want

    def _expose_shards(self, b: int, buf: FlatBuffer, scale: float | None) -> None:
        """``p.grad``'s local shards <- ``A * scale`` (``None``: as is) where present, else ``p.grad = None``;
        ``A <- 0``."""
        acc_views = buf.segment_views(self.acc[b])
        targets, sources = [], []
        for j, (p, present) in enumerate(zip(buf.owners, self.present[b])):
            if not present:
                p.grad = None
                continue
            if p.grad is None:  # cleared since its micro-batch: a zero DTensor like the parameter's
                p.grad = torch.zeros_like(p)
            targets.append(local_tensor(p.grad))
            sources.append(acc_views[j])
        if targets:
            torch._foreach_copy_(targets, sources)
            if scale is not None and scale != 1.0:
                torch._foreach_mul_(targets, scale)
        self.acc[b].zero_()

    def after_step(self) -> None:
        """After the optimizer's step: ``G <- 0`` (FSDP2: the ``p.grad`` shards) for the next backward;
        nobody took part yet."""
        for buf in self.layout.buffers:
            buf.grad.zero_()
            if buf.sharded:
                shards = [g for g in buf.grads() if g is not None]
                if shards:
                    torch._foreach_zero_(shards)
        self._restart()

    def discard(self) -> None:
        """Drop the step's sum (``A <- 0``; ``G`` is zero after the last fused pass)."""
        for acc in self.acc:
            acc.zero_()
        self._restart()

    def _restart(self) -> None:
        self.present = [[False] * b.num_segments for b in self.layout.buffers]
        self.missing = len(self.layout.params)

    # -- a new layout ---------------------------------------------------------------------------------

    def carry(self, old: StepBuffers) -> None:
        """Take over ``old``'s state for the parameters both layouts hold: the sum ``A`` (mid-step), the
        gradient of the micro-batch in flight (``p.grad`` views into the old ``G``), participation, hits."""
        for ob, obuf in enumerate(old.layout.buffers):
            for oj, p in enumerate(obuf.owners):
                where = self.layout.find(p)
                if where is None:
                    continue
                b, j = where
                (olo, ohi), (lo, hi) = obuf.bounds[oj], self.layout.buffers[b].bounds[j]
                self.acc[b][lo:hi].copy_(old.acc[ob][olo:ohi])
                old._move_bound(ob, oj, self, b, j)
                if old.present[ob][oj]:
                    self.commit([(b, j)])
        self.hits.extend(p for p in old.hits if self.layout.find(p) is not None)

    def _move_bound(self, b: int, j: int, to: StepBuffers, tb: int, tj: int) -> None:
        """If ``p.grad`` (parameter ``j`` of buffer ``b``) is still our view, copy it into ``to``'s view of
        segment ``(tb, tj)`` and point ``p.grad`` there."""
        p = self.layout.buffers[b].params[j]
        if p.grad is not None and p.grad is self._bound[b][j]:
            view = to._views[tb][tj]
            if view is not p.grad:
                view.copy_(p.grad)
                p.grad = view
            to._bound[tb][tj] = view
