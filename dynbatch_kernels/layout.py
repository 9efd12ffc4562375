"""FlatLayout: a model's parameters and gradients as one contiguous flat buffer per (device, dtype).

With ``bind=True`` every parameter's ``.data`` and ``.grad`` are rebound as views into its buffer, so
``loss.backward()`` accumulates straight into the flat gradient buffer and one kernel launch covers the
whole model (the zero-copy fast path). With ``bind=False`` the buffers are private working copies and the
user's tensors stay where they are. Either way correctness never depends on the views: the ``gather_*``
methods copy in whatever is not (or no longer) a view (after ``model.zero_grad()``, ``p.data = ...``, DDP's
bucket views) and :meth:`FlatBuffer.scatter_data` copies results back. Each parameter is one segment; a
segment starts on an ``align``-element boundary so every view stays vector-aligned, and the few padding
elements after it are zero and stay zero under every op.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

import torch

from dynbatch_kernels.chunks import CHUNK_SIZE, ChunkTable
from dynbatch_kernels.scans import grads_of, misfits
from dynbatch_kernels.sharding import is_dtensor, local_tensor

ParamsLike = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict]


class Grads(NamedTuple):
    """The gradients of a buffer's segments as found (``None``: none), the segments without one
    (``missing``) and those whose parameter has ``requires_grad=False`` (``frozen``)."""

    tensors: list[torch.Tensor | None]
    missing: list[int]
    frozen: list[int]


@dataclass
class FlatBuffer:
    """One (device, dtype) group: flat ``data`` and ``grad``, and the segment table over them.

    ``params[j]`` is the tensor segment ``j`` mirrors: the parameter itself, or for a DTensor parameter
    (FSDP2) this rank's local shard of it; ``owners[j]`` is the parameter (its ``.grad`` and
    ``requires_grad`` are read there).
    """

    device: torch.device
    dtype: torch.dtype
    data: torch.Tensor
    grad: torch.Tensor
    chunks: ChunkTable
    names: list[str]
    params: list[torch.Tensor]
    bounds: list[tuple[int, int]] = field(repr=False)
    owners: list[torch.Tensor] = field(default=None, repr=False)
    #: The parameters' shapes when the buffer was built (their segments' views have these).
    shapes: list[torch.Size] = field(init=False, repr=False)
    #: Whether ``params`` are DTensor parameters' local shards (``owners`` the parameters).
    sharded: bool = field(init=False, repr=False)
    _views: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _starts: dict[tuple[int, int], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.shapes = [p.shape for p in self.params]
        if self.owners is None:
            self.owners = self.params
        self.sharded = self.owners is not self.params

    def grads(self) -> list[torch.Tensor | None]:
        """Each segment's gradient: ``p.grad``, or the local shard of a DTensor parameter's."""
        if not self.sharded:
            return [p.grad for p in self.params]
        return [None if o.grad is None else local_tensor(o.grad) for o in self.owners]

    def refresh_shards(self) -> None:
        """Point ``params`` at the DTensor parameters' local shards as they are now (``p.data = ...``)."""
        if self.sharded:
            self.params[:] = [local_tensor(o) for o in self.owners]

    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[S+1]`` on the buffer's device: segment ``j`` starts at ``offsets[j]`` and holds its
        parameter's ``numel`` elements; the rest up to ``offsets[j+1]`` is padding."""
        return self.chunks.offsets

    @property
    def num_segments(self) -> int:
        return len(self.params)

    def segment_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every segment of ``flat`` (``data``, ``grad``, or a tensor laid out like them) in its parameter's
        shape. Cached for ``data`` and the current ``grad`` only, so no other storage is kept alive."""
        key = flat.data_ptr()
        views = self._views.get(key)
        if views is None:
            with torch.enable_grad():  # views made in no_grad mode could not be written in grad mode
                views = [flat[lo:hi].view(shape) for shape, (lo, hi) in zip(self.shapes, self.bounds)]
        live = (self.data.data_ptr(), self.grad.data_ptr())
        self._views = {k: v for k, v in self._views.items() if k in live}
        if key in live:
            self._views[key] = views
        return views

    def data_view(self, j: int) -> torch.Tensor:
        """Segment ``j`` of ``data`` in its parameter's shape."""
        return self.segment_views(self.data)[j]

    def grad_view(self, j: int) -> torch.Tensor:
        """Segment ``j`` of (the current) ``grad`` in its parameter's shape."""
        return self.segment_views(self.grad)[j]

    def data_is_view(self, j: int) -> bool:
        """Whether parameter ``j`` is (still) the view of segment ``j`` of ``data``."""
        return not self.outside(self.data, [self.params[j]], [j])

    def grad_is_view(self, j: int) -> bool:
        """Whether ``.grad`` of parameter ``j`` is the view of segment ``j`` of (the current) ``grad``."""
        return not self.outside(self.grad, [self.grads()[j]], [j])

    def outside(
        self, flat: torch.Tensor, tensors: list[torch.Tensor | None], segments: list[int] | None = None
    ) -> list[int]:
        """The segments (``segments``, default all) whose tensor in ``tensors`` is ``None`` or not the view of
        its segment of ``flat``. A tensor that starts at its segment's address lies in ``flat``'s storage and
        is taken to be that view (only a dtype or stride reinterpretation of the package's own buffer could
        differ; checking for it would double the cost of this per-step scan); an empty tensor always is."""
        starts = self._segment_starts(flat)
        if segments is None:
            return misfits(tensors, starts)
        return [segments[i] for i in misfits(tensors, [starts[j] for j in segments])]

    def _segment_starts(self, flat: torch.Tensor) -> list[int]:
        """The address of every segment of ``flat`` (one address space, all devices); cached for the last few
        storages (``data``, ``grad`` and the accumulator's swapped buffers)."""
        key = (flat.data_ptr(), flat.element_size())
        starts = self._starts.get(key)
        if starts is None:
            if len(self._starts) >= 4:
                self._starts.clear()
            starts = self._starts[key] = [key[0] + lo * key[1] for lo, _ in self.bounds]
        return starts

    def scan_grads(self) -> Grads:
        """Each segment's gradient as it is now (:meth:`grads`), and which segments have none or a frozen
        parameter: one scan over the parameters."""
        if not self.sharded:
            return Grads(*grads_of(self.params))
        grads = self.grads()
        missing = [j for j, g in enumerate(grads) if g is None]
        return Grads(grads, missing, [j for j, o in enumerate(self.owners) if not o.requires_grad])

    @torch.no_grad()
    def gather_grads(self) -> Grads:
        """Make ``grad`` hold every ``p.grad``; return them as found (:meth:`scan_grads`).

        A ``p.grad`` that is the segment's view costs nothing; the other tensors are copied in (one read,
        one write; one multi-tensor copy for all of them); the segment of a ``None`` gradient is zeroed so
        no stale value reaches a kernel.
        """
        found = self.scan_grads()
        grads = found.tensors
        outside = self.outside(self.grad, grads)
        if outside:
            views = self.segment_views(self.grad)
            copied = [j for j in outside if grads[j] is not None]
            for j in copied:
                if grads[j].shape != self.shapes[j]:
                    got = tuple(grads[j].shape)
                    raise ValueError(
                        f"{self.names[j]}: expected .grad of shape {tuple(self.shapes[j])}, got {got}"
                    )
            _copy([views[j] for j in copied], [grads[j] for j in copied])
            cleared = [views[j] for j in outside if grads[j] is None]
            if cleared:
                torch._foreach_zero_(cleared)
        return found

    @torch.no_grad()
    def grad_operand(self) -> tuple[list[torch.Tensor], Grads]:
        """Every ``p.grad`` where it lives, for the fused ops to read in place (one tensor per segment, a
        list made for this call), and the gradients as found (:meth:`scan_grads`).

        A segment whose ``p.grad`` is None gets its view of ``grad`` (not read: such a segment is skipped);
        one whose ``p.grad`` is not contiguous gets the view holding a copy of it.
        """
        found = self.scan_grads()
        operand = list(found.tensors)
        odd = misfits(operand, None)
        if odd:
            views = self.segment_views(self.grad)
            for j in odd:
                if operand[j] is not None:
                    views[j].copy_(operand[j])
                operand[j] = views[j]
        return operand, found

    @torch.no_grad()
    def gather_data(self) -> None:
        """Copy every parameter that is not its segment's view into ``data``."""
        outside = self.outside(self.data, self.params)
        if outside:
            views = self.segment_views(self.data)
            _copy([views[j] for j in outside], [self.params[j] for j in outside])

    @torch.no_grad()
    def scatter_data(self) -> None:
        """Copy ``data`` back into every parameter that is not its segment's view."""
        outside = self.outside(self.data, self.params)
        if outside:
            views = self.segment_views(self.data)
            _copy([self.params[j] for j in outside], [views[j] for j in outside])

    def bind_grads(self) -> None:
        """Point every ``p.grad`` at its segment of ``grad`` (values are not copied)."""
        for j in self.outside(self.grad, [p.grad for p in self.params]):
            self.params[j].grad = self.grad_view(j)

    def is_stale(self, j: int) -> bool:
        """Whether parameter ``j`` no longer fits its segment: its device, dtype or shape changed
        (``model.half()``, ``.to(...)``, ``p.data = other``)."""
        p = self.params[j]
        return p.device != self.device or p.dtype != self.dtype or p.shape != self.shapes[j]

    def stale(self) -> str | None:
        """The name of the first parameter that no longer fits its segment (see :meth:`is_stale`), or None."""
        self.refresh_shards()
        return next((self.names[j] for j in range(self.num_segments) if self.is_stale(j)), None)


def named_params(params: ParamsLike) -> list[tuple[str, torch.Tensor]]:
    """Normalise tensors, ``named_parameters()`` pairs or param groups to ``(name, tensor)`` pairs."""
    items = list(params)
    if items and isinstance(items[0], dict):
        pairs = []
        for g, group in enumerate(items):
            group_params = group.get("params")
            if group_params is None:
                raise ValueError(f"params: param group {g} has no 'params' entry")
            if isinstance(group_params, torch.Tensor):
                group_params = [group_params]
            for i, p in enumerate(group_params):
                pairs.append(p if isinstance(p, tuple) else (f"group{g}.param{i}", p))
        return pairs
    return [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(items)]


class FlatLayout:
    """Parameters -> one flat buffer per (device, dtype), by default with ``p.data``/``p.grad`` rebound as
    views into it.

    Args:
        params: tensors, ``model.named_parameters()`` or param groups (dicts with ``"params"``).
        align: segment starts are multiples of this many elements (1 packs them tightly).
        chunk_size: elements per kernel work item (see :mod:`dynbatch_kernels.chunks`).
        bind: rebind ``p.data`` / ``p.grad`` as views into the buffers (``False``: private copies, the
            user's tensors untouched).

    Parameters that share storage, are sparse, complex, not floating point, or not leaf tensors are
    refused; so are DTensors (FSDP2) with ``bind=True``. With ``bind=False`` a DTensor's segment mirrors
    its local shard (see :class:`FlatBuffer`). With ``bind=True``, keeping the gradients as the installed
    views (``zero_grad(set_to_none=False)`` or :meth:`zero_grad`) avoids a copy per step;
    :meth:`check_grads` says which one is not.
    """

    def __init__(
        self, params: ParamsLike, *, align: int = 16, chunk_size: int = CHUNK_SIZE, bind: bool = True
    ):
        if align <= 0:
            raise ValueError(f"align: expected a positive int, got {align}")
        pairs = named_params(params)
        if not pairs:
            raise ValueError("params: expected at least one parameter, got none")
        check_params(pairs, sharded=not bind)
        groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
        for name, p in pairs:
            local = local_tensor(p)
            groups.setdefault((local.device, local.dtype), []).append((name, p))
        self.buffers = [
            _flatten(device, dtype, members, align, chunk_size, bind)
            for (device, dtype), members in groups.items()
        ]
        self._where = {id(p): (b, j) for b, buf in enumerate(self.buffers) for j, p in enumerate(buf.owners)}

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{b.dtype}@{b.device}: {b.num_segments} segments, {b.data.numel()} elements"
            for b in self.buffers
        )
        return f"FlatLayout({parts})"

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters, buffer by buffer in segment order (DTensors themselves, not their shards)."""
        return [p for b in self.buffers for p in b.owners]

    @property
    def offsets(self) -> torch.Tensor:
        """The segment table of a single-buffer layout (see :class:`FlatBuffer`)."""
        return self.only().offsets

    @property
    def names(self) -> list[str]:
        """Segment names of a single-buffer layout, in segment order."""
        return self.only().names

    @property
    def chunks(self) -> ChunkTable:
        return self.only().chunks

    def locate(self, param: torch.Tensor) -> tuple[int, int]:
        """``(buffer index, segment index)`` of ``param``."""
        where = self.find(param)
        if where is None:
            raise KeyError(f"param: a tensor of shape {tuple(param.shape)} not in this layout")
        return where

    def find(self, param: torch.Tensor) -> tuple[int, int] | None:
        """``(buffer index, segment index)`` of ``param``, or None when it is not in this layout."""
        return self._where.get(id(param))

    def only(self) -> FlatBuffer:
        """The single buffer of a single-(device, dtype) layout."""
        if len(self.buffers) != 1:
            raise ValueError(f"layout: expected one (device, dtype) buffer, got {len(self.buffers)}")
        return self.buffers[0]

    def zero_grad(self) -> None:
        for buf in self.buffers:
            buf.grad.zero_()

    def check_grads(self) -> None:
        """Raise if any ``p.grad`` is not the view into the flat buffer (a diagnostic for the fast path:
        the ops themselves copy such gradients in, see :meth:`FlatBuffer.gather_grads`)."""
        for buf in self.buffers:
            for j in buf.outside(buf.grad, buf.grads())[:1]:
                state = "None" if buf.params[j].grad is None else "a separate tensor"
                raise RuntimeError(
                    f"{buf.names[j]}: expected .grad to be the layout's flat-buffer view, got {state}"
                )

    def stale(self) -> str | None:
        """The first parameter that no longer matches its segment (see :meth:`FlatBuffer.stale`), or None."""
        return next((name for buf in self.buffers if (name := buf.stale()) is not None), None)


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``targets[i] <- sources[i]`` (cast, across devices) in one multi-tensor call."""
    if targets:
        torch._foreach_copy_(targets, sources)


def check_params(pairs: list[tuple[str, torch.Tensor]], *, sharded: bool = False) -> None:
    """Raise unless every ``(name, tensor)`` is a distinct dense real floating-point leaf tensor with storage
    of its own (the errors name the parameter); ``sharded``: DTensors are accepted (their local shards
    are checked)."""
    fsdp1 = sys.modules.get("torch.distributed.fsdp._flat_param")  # no FSDP1 FlatParameter unless imported
    seen: dict[int, str] = {}
    storages: list[tuple[int, int, str]] = []
    for name, p in pairs:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(p).__name__}")
        if is_dtensor(p) and not sharded:
            raise TypeError(
                f"{name}: a DTensor (FSDP2) parameter cannot be bound to a flat buffer (bind=True): FSDP2 "
                "owns its storage. Use bind=False (the segments then mirror the local shards), or let "
                "FusedLAMB, ExtrapSGD or GradientAccumulator build their own layout: they handle FSDP2"
            )
        if fsdp1 is not None and isinstance(p, fsdp1.FlatParameter):
            raise TypeError(
                f"{name}: an FSDP1 FlatParameter (FullyShardedDataParallel) holds a shard of many layers in "
                "one tensor: per-layer norms (LAMB's trust ratios, the angle statistics) cannot be taken "
                "from it. Use FSDP2 (torch.distributed.fsdp.fully_shard), which FusedLAMB and ExtrapSGD "
                "step exactly, or DDP"
            )
        if id(p) in seen:
            raise ValueError(f"{name}: the same tensor is listed twice (also as {seen[id(p)]})")
        seen[id(p)] = name
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense parameter, got layout {p.layout}")
        if p.is_complex():
            raise TypeError(
                f"{name}: complex parameters are not supported (got {p.dtype}); keep the parameter real "
                "with a trailing dimension of 2 and view it with torch.view_as_complex in the forward"
            )
        if not p.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point parameter, got {p.dtype}")
        if not p.is_leaf:
            raise ValueError(f"{name}: expected a leaf tensor (a parameter), got a computed tensor")
        local = local_tensor(p)
        if local.numel():
            start = local.untyped_storage().data_ptr() + local.storage_offset() * local.element_size()
            storages.append((start, start + local.numel() * local.element_size(), name))
    storages.sort()
    for (_, end, first), (start, _, second) in pairwise(storages):
        if start < end:
            raise ValueError(f"{second}: shares storage with {first}; untie or list it once")


def _flatten(
    device: torch.device,
    dtype: torch.dtype,
    members: list[tuple[str, torch.Tensor]],
    align: int,
    chunk_size: int,
    bind: bool,
) -> FlatBuffer:
    owners = [p for _, p in members]
    members = [(name, local_tensor(p)) for name, p in members]
    bounds, offsets, cursor = [], [0], 0
    for _, p in members:
        bounds.append((cursor, cursor + p.numel()))
        cursor += -(-p.numel() // align) * align
        offsets.append(cursor)
    data = torch.zeros(cursor, dtype=dtype, device=device)
    grad = torch.zeros(cursor, dtype=dtype, device=device)
    for (_, p), (lo, hi) in zip(members, bounds):
        view = data[lo:hi].view_as(p)
        view.copy_(p.detach())
        if bind:
            grad_view = grad[lo:hi].view_as(p)
            if p.grad is not None:
                grad_view.copy_(p.grad)
            p.data = view
            p.grad = grad_view
    return FlatBuffer(
        device=device,
        dtype=dtype,
        data=data,
        grad=grad,
        chunks=ChunkTable.from_offsets(
            offsets, device=device, chunk_size=chunk_size, lengths=[hi - lo for lo, hi in bounds]
        ),
        names=[name for name, _ in members],
        params=[p for _, p in members],
        bounds=bounds,
        owners=None if all(o is p for o, (_, p) in zip(owners, members)) else owners,
    )
