"""FlatOptimizer: ``torch.optim.Optimizer`` plumbing for optimizers whose step is fused flat-buffer ops.

The ops run on a :class:`~dynbatch_kernels.FlatLayout`: one flat buffer per (device, dtype) of the
parameters, one of their gradients. By default the optimizer builds a private one (``bind=False``), so
``p.data`` and ``p.grad`` stay where the user and torch put them. Optimizers that set
:attr:`FlatOptimizer.reads_in_place` (``FusedLAMB``, ``ExtrapSGD``) hand the ops the parameters and
gradients themselves, one tensor per segment, which the kernels read and write where they live (through
per-segment address tables): no copy in or out. A parameter whose ``p.grad`` is ``None`` (or with
``requires_grad=False``) is skipped: no update, no state change. A non-contiguous ``p.grad`` is copied
into the private gradient buffer first; non-contiguous parameters put their whole buffer on the copying
path below. The private buffers then serve the update ``u`` of LAMB (the gradient buffer) and nothing
else that the step reads.

The copying path (other subclasses, or non-contiguous parameters) each step

1. gathers the gradients: one copy of each ``p.grad`` that is not the layout's view;
2. gathers the parameters likewise and follows changes made to them outside the optimizer (below);
3. runs the fused ops over the flat buffers;
4. scatters the parameters back: one copy of each that is not the layout's view,

24 more bytes per float32 element and step (gather ``g`` and ``w``, scatter ``w``).

A caller's layout built with ``bind=True`` (``layout=...``) keeps the zero-copy path: the parameters and
gradients that are its views are used in place. The per-element state lives in flat buffers beside each
layout buffer and ``self.state[p]`` holds views into them, so ``state_dict()`` is torch's per-parameter
format.

Changes from outside: after each of its own writes the optimizer records every parameter's ``(data_ptr,
_version)``; a parameter whose pair differs at the next step was changed by someone else (``p.data =
...``, ``model.load_state_dict``, an in-place op). Its float32 master copy (bfloat16/float16 parameters)
then follows it, unless the parameter still equals the master rounded to its dtype (a checkpoint loads
both; a master is never rounded by the optimizer's own writes). torch does not version in-place writes
through ``p.data``: after one to a bfloat16/float16 parameter, call :meth:`sync_master_weights`. A
parameter whose device, dtype or shape changed (``model.half()``, ``.to(...)``) rebuilds the private
layout, its state carried over (cast; a master copy created for a parameter that became bfloat16/float16;
restarted for one whose size changed). Subclasses follow outside changes of their own copies too
(:meth:`_follow`).

A subclass provides:

- ``state_dtypes``: its per-element state, ``{name: dtype}`` (``None``: the parameter's dtype);
- ``hyper_row(group)``: one row of its per-segment hyper-parameter table per param
  group (``group=None``: the row of a segment the step must leave untouched);
- ``check_group(group, where)``: validation of one group's hyper-parameters (``where`` prefixes the names
  in the errors, e.g. ``"param_groups[1]."``); it runs at construction, in ``add_param_group`` and at
  every step (host values only), before anything is written;
- ``step()``, which calls :meth:`_prepare` (the flat states, gathered, with fresh hyper tables), its ops,
  then :meth:`_publish`; :meth:`_amp_scalars` gives the GradScaler's tensors.

It gets: ``add_param_group`` at any time, an exact ``load_state_dict`` (values copied into the flat
buffers, never cast to the parameter dtype as ``torch.optim`` does, so float32 state of bfloat16
parameters loads bit-exactly), float32 master weights for bfloat16/float16 parameters, per-segment step
counts (``state[p]["step"]``), ``maximize`` (the gathered gradient negated), pickling and
``copy.deepcopy`` (the layout rebuilt from ``param_groups``), and the GradScaler protocol
(``_step_supports_amp_scaling``: the scaler sets ``self.grad_scale`` and ``self.found_inf`` for the
duration of ``step()``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar

import torch

from dynbatch_kernels.checks import GRAD_DTYPES
from dynbatch_kernels.layout import FlatBuffer, FlatLayout, check_params
from dynbatch_kernels.scans import tensor_marks
from dynbatch_kernels.sharding import Sharding, is_dtensor

#: The state entry holding the float32 master copy of a bfloat16/float16 parameter.
MASTER = "master_param"
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class FlatState:
    """The optimizer's side of one layout buffer.

    ``tensors``: flat per-element state (``MASTER`` included when kept); ``step``: float32 ``[S]`` steps
    per segment; ``groups``: the param group of each segment (-1: not optimized by this optimizer);
    ``marks``: each parameter's ``(data_ptr, _version)`` as the optimizer's last write left it; ``index``:
    the hyper row each segment got in the current call (its group, or -1: left untouched); ``hyper``: the
    ``[S, len(hyper_row(...))]`` device table, rebuilt when ``key`` (what it was built from) changes;
    ``in_place``: the ops read the parameters and gradients where they live, ``params`` and ``grads``
    being the operands of this call (one tensor per segment, or the buffer's flat ``data`` and ``grad``).
    """

    buffer: FlatBuffer
    tensors: dict[str, torch.Tensor]
    step: torch.Tensor
    groups: tuple[int, ...]
    marks: list[tuple[int, int]] = field(default_factory=list, repr=False)
    index: tuple[int, ...] = ()
    hyper: torch.Tensor | None = None
    key: tuple = field(default=(), repr=False)
    in_place: bool = False
    params: torch.Tensor | list[torch.Tensor] | None = field(default=None, repr=False)
    grads: torch.Tensor | list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def master(self) -> torch.Tensor | None:
        return self.tensors.get(MASTER)


class FlatOptimizer(torch.optim.Optimizer):
    """Base class: see the module docstring. Keyword arguments of subclasses:

    Args:
        layout: a :class:`FlatLayout` to work on instead of a private one. It must contain every parameter
            of the optimizer (segments of other parameters are left untouched); parameters and gradients
            that are its views (``bind=True``, its default) are used in place, without copies. It cannot
            follow a parameter's change of device, dtype or shape (the step raises; a private layout is
            rebuilt). Pickling and ``copy.deepcopy`` give an optimizer with a private layout.
        master_weights: keep a float32 master copy of bfloat16/float16 parameters (default: yes). The
            step updates the master and rounds it into the parameter, so updates smaller than the
            parameter's precision still accumulate.
    """

    state_dtypes: ClassVar[dict[str, torch.dtype | None]] = {}
    #: The subclass's ops take the parameters and gradients where they live (``FlatState.params`` and
    #: ``.grads`` are per-segment lists under a private layout whose parameters are contiguous).
    reads_in_place: ClassVar[bool] = False
    #: Attributes that pickling and ``copy.deepcopy`` carry besides torch's three.
    pickled: ClassVar[tuple[str, ...]] = ("master_weights",)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        layout: FlatLayout | None = None,
        master_weights: bool | None = None,
    ):
        if layout is not None and not isinstance(layout, FlatLayout):
            raise TypeError(f"layout: expected a FlatLayout or None, got {type(layout).__name__}")
        if master_weights is not None and not isinstance(master_weights, bool):
            raise TypeError(f"master_weights: expected a bool or None, got {master_weights!r}")
        self.check_group(defaults, "")
        self._layout, self._owns_layout = layout, layout is None
        self.master_weights = master_weights
        self._init_flat()
        super().__init__(params, defaults)
        self._build()
        self._built = True

    # ---- what subclasses define ----

    def check_group(self, group: dict[str, Any], where: str) -> None:
        raise NotImplementedError

    def hyper_row(self, group: dict[str, Any] | None) -> list[float]:
        raise NotImplementedError

    # ---- torch.optim.Optimizer API ----

    @property
    def layout(self) -> FlatLayout:
        """The layout holding every parameter of this optimizer (the private one is rebuilt first when a
        parameter changed device, dtype or size: hold the optimizer, not the layout, across such changes).
        """
        self._refresh()
        assert self._layout is not None
        return self._layout

    @property
    def built_layout(self) -> FlatLayout | None:
        """The layout as last built, without :attr:`layout`'s scan of every parameter first (for callers
        that follow the layout object at every call, such as the gradient accumulator mid-step)."""
        return self._layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate and add a group. Its parameters must be in a caller's layout; a private layout is rebuilt
        over all parameters (state kept)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        settings = {k: v for k, v in param_group.items() if k != "params"}
        self.check_group({**self.defaults, **settings}, f"param_groups[{len(self.param_groups)}].")
        super().add_param_group(param_group)
        if self._built:
            try:
                self._build()  # checks the new parameters before it changes anything
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: hyper-parameters into ``param_groups``, state copied into the flat
        buffers (``master_param`` may be missing, or present for a parameter kept without one: the master
        then follows the parameter). Every check runs before anything is written; load-state-dict hooks
        run as in torch. The parameters as they are at the next step go with the loaded state."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: expected {len(self.param_groups)} param groups, got {len(saved_groups)}"
            )
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict: expected {len(group['params'])} parameters in param group {g}, "
                    f"got {len(saved['params'])}"
                )
            settings = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            self.check_group({**self.defaults, **settings}, f"state_dict['param_groups'][{g}].")
        ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = [p for group in self.param_groups for p in group["params"]]
        unknown = set(state_dict["state"]) - set(ids)
        if unknown:
            raise ValueError(f"state_dict: state for unknown parameter ids {sorted(unknown)[:4]}")
        self._refresh()
        copies = []
        for pid, p in zip(ids, params):
            target, saved = self.state[p], state_dict["state"].get(pid)
            if saved is None or set(saved) - {MASTER} != set(target) - {MASTER}:
                got = "nothing" if saved is None else sorted(saved)
                raise ValueError(f"state_dict: expected state[{pid}] with keys {sorted(target)}, got {got}")
            for key, value in saved.items():
                if key not in target:
                    continue
                value = torch.as_tensor(value)
                if value.numel() != target[key].numel() or (key != "step" and value.shape != p.shape):
                    raise ValueError(
                        f"state_dict: expected state[{pid}][{key!r}] of shape {tuple(target[key].shape)}, "
                        f"got {tuple(value.shape)}"
                    )
                copies.append((target[key], value))
        with torch.no_grad():
            for target, value in copies:
                _copy_state(target, value)
        for group, saved in zip(self.param_groups, saved_groups):
            for key, default in self.defaults.items():
                saved.setdefault(key, default)
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.param_groups = saved_groups
        self._loaded = True
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @torch.no_grad()
    def sync_master_weights(self) -> None:
        """Copy the parameters into their float32 master copies. Needed only after an in-place write
        through ``p.data``, which torch does not version; other changes are followed at the next step."""
        self._refresh()
        for st in self.flat_states:
            if st.master is not None:
                st.buffer.gather_data()
                st.master.copy_(st.buffer.data)

    def __getstate__(self) -> dict[str, Any]:
        """torch's ``defaults``, ``param_groups`` and ``state`` (compact copies, not views of the flat
        buffers), and :attr:`pickled`; the layout (private, also if a caller's was used) and the flat
        state are rebuilt on loading."""
        state = defaultdict(dict, {p: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()})
        carried = {name: getattr(self, name) for name in self.pickled}
        return {"defaults": self.defaults, "param_groups": self.param_groups, "state": state, **carried}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layout, self._owns_layout = None, True
        self._init_flat()
        self._build()
        self._built = True

    # ---- for step() ----

    def _prepare(self) -> list[FlatState]:
        """Bring the flat buffers up to date for one call: validate the hyper-parameters (schedulers and
        users write them between steps), refresh the layout (:meth:`_refresh`), gather the parameters
        (following outside changes) and the gradients, pick each segment's hyper row (untouched without a
        gradient), negate the gradients of ``maximize`` groups, and refresh the hyper tables (host ->
        device only when they change)."""
        for g, group in enumerate(self.param_groups):
            self.check_group(group, f"param_groups[{g}].")
        rows = [self.hyper_row(group) for group in self.param_groups] + [self.hyper_row(None)]
        key_rows = tuple(map(tuple, rows))
        self._gather_params(self._refresh())
        for st in self.flat_states:
            if st.in_place:
                st.grads, found = st.buffer.grad_operand()
            else:
                st.grads, found = st.buffer.grad, st.buffer.gather_grads()
            # -1 (not optimized, no gradient, or requires_grad=False) picks the last row: hyper_row(None)
            st.index = st.groups
            if found.missing or found.frozen:
                index = list(st.groups)
                for j in chain(found.missing, found.frozen):
                    index[j] = -1
                st.index = tuple(index)
            self._negate_maximized(st)
            if (key_rows, st.index) == st.key:
                continue
            table = torch.tensor(rows, dtype=torch.float32)[torch.tensor(st.index, dtype=torch.int64)]
            if st.hyper is None:
                st.hyper = table.to(st.buffer.device)
            else:
                if st.hyper.device.type == "cuda":
                    table = table.pin_memory()
                st.hyper.copy_(table, non_blocking=True)
            st.key = (key_rows, st.index)
        return self.flat_states

    @torch.no_grad()
    def _publish(self) -> None:
        """After the optimizer's own writes to the flat parameters: copy them into the parameters that are
        not views, and record what it left there (see :meth:`_moved`)."""
        for st in self.flat_states:
            if not st.in_place:
                st.buffer.scatter_data()
            st.marks = _marks(st.buffer)

    @torch.no_grad()
    def _negate_maximized(self, st: FlatState) -> None:
        """Negate the flat gradient of the segments stepped in a ``maximize`` group (called again to undo).
        With a caller's bound layout that is the user's ``p.grad`` view, negated for the step's duration;
        reading in place, the negated copy goes into the private buffer (nothing to undo)."""
        if not any(group["maximize"] for group in self.param_groups):
            return
        for j, g in enumerate(st.index):
            if g >= 0 and self.param_groups[g]["maximize"]:
                if st.in_place:  # negated into the private buffer: the user's p.grad stays as it is
                    view = st.buffer.grad_view(j)
                    torch.neg(st.grads[j], out=view)
                    st.grads[j] = view  # a list made for this call (FlatBuffer.grad_operand)
                    continue
                lo, hi = st.buffer.bounds[j]
                st.buffer.grad[lo:hi].neg_()

    def _amp_scalars(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(1 / grad_scale, found_inf)`` on ``device`` as the GradScaler set them for this step, or None."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv = None if grad_scale is None else grad_scale.to(device, torch.float32).reciprocal()
        found = None if found_inf is None else found_inf.to(device, torch.float32)
        return inv, found

    @torch.no_grad()
    def _gather_params(self, moved: list[list[int]]) -> None:
        """Copy the parameters that are not views into the flat buffers; follow those ``moved`` (per flat
        state, from :meth:`_refresh`; all of them after :meth:`load_state_dict`)."""
        for st, segments in zip(self.flat_states, moved):
            if segments or st.params is None:
                params = st.buffer.params
                st.in_place = (
                    self.reads_in_place and self._owns_layout and all(p.is_contiguous() for p in params)
                )
                st.params = list(params) if st.in_place else st.buffer.data
            if not st.in_place:
                st.buffer.gather_data()
            if self._loaded:
                segments = list(range(st.buffer.num_segments))
            if segments:
                self._follow(st, segments)
        self._loaded = False

    @staticmethod
    def _moved(st: FlatState) -> list[int]:
        """Segments whose parameter changed outside the optimizer since its last write."""
        now = _marks(st.buffer)
        if now == st.marks:
            return []
        return [j for j, (mark, left) in enumerate(zip(now, st.marks)) if mark != left]

    @torch.no_grad()
    def _follow(self, st: FlatState, moved: list[int]) -> None:
        """The master copies of the ``moved`` segments follow their parameters where these no longer equal
        the master rounded to their dtype (no host synchronisation). Subclasses extend it."""
        if st.master is None:
            return
        for j in moved:
            lo, hi = st.buffer.bounds[j]
            param = st.buffer.params[j].detach().reshape(-1) if st.in_place else st.buffer.data[lo:hi]
            master = st.master[lo:hi]
            master.copy_(torch.where((param != master.to(param.dtype)).any(), param, master))

    # ---- construction ----

    def _init_flat(self) -> None:
        self.flat_states: list[FlatState] = []
        #: How the parameters are split when they are DTensors (FSDP2), else None.
        self.sharding: Sharding | None = None
        self._loaded = False
        self._built = False

    def _refresh(self) -> list[list[int]]:
        """Per flat state, the segments whose parameter changed outside the optimizer since its last write
        (:meth:`_moved`). If one of them no longer fits its segment (device, dtype, shape), the private
        layout is rebuilt first (a caller's layout cannot follow: raise)."""
        moved = [self._moved(st) for st in self.flat_states]
        recast = [
            (st.buffer, j) for st, js in zip(self.flat_states, moved) for j in js if st.buffer.is_stale(j)
        ]
        if not recast:
            return moved
        if not self._owns_layout:
            buf, j = recast[0]
            raise RuntimeError(
                f"{buf.names[j]}: its device, dtype or shape changed after the optimizer's layout was built; "
                "a caller's FlatLayout cannot follow: build a new layout and optimizer, or let the optimizer "
                "own its layout (it follows such changes)"
            )
        self._layout = None
        self._build(recast={id(buf.owners[j]) for buf, j in recast})
        return [self._moved(st) for st in self.flat_states]

    def _build(self, recast: frozenset[int] | set[int] = frozenset()) -> None:
        """Make the layout cover every parameter, allocate the flat state, point ``self.state`` into it and
        carry over the state held so far (cast; restarted for a parameter whose size changed). The
        parameters whose ids are in ``recast`` changed device or dtype: not an outside change."""
        # a group may list a tensor twice (torch warns, in add_param_group): it is one segment
        params = list({id(p): p for group in self.param_groups for p in group["params"]}.values())
        indexed = [(f"params[{i}]", p) for i, p in enumerate(params)]
        check_params(indexed, sharded=True)
        self.sharding = Sharding.of(indexed)
        for p in params:
            if p.dtype not in GRAD_DTYPES:
                names = ", ".join(str(d) for d in GRAD_DTYPES)
                raise TypeError(f"params: expected parameters of dtype in ({names}), got {p.dtype}")
        previous = {p: dict(self.state[p]) for p in params if p in self.state}
        left = {id(p): mark for st in self.flat_states for p, mark in zip(st.buffer.owners, st.marks)}
        layout = self._layout
        missing = [p for p in params if layout is None or layout.find(p) is None]
        if missing and not self._owns_layout:
            raise ValueError(
                f"layout: expected every parameter of the optimizer in the given layout, "
                f"got {len(missing)} outside it (the first of shape {tuple(missing[0].shape)})"
            )
        if missing:
            named: dict[int, tuple[str, torch.Tensor]] = {}
            for g, group in enumerate(self.param_groups):
                for name, p in zip(group.get("param_names", _default_names(g, group)), group["params"]):
                    named.setdefault(id(p), (name, p))
            layout = FlatLayout(list(named.values()), bind=False)
        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        self._layout = layout
        self.flat_states = [self._new_state(buf, group_of) for buf in layout.buffers]
        for st in self.flat_states:
            for j, (p, (lo, hi)) in enumerate(zip(st.buffer.owners, st.buffer.bounds)):
                if id(p) in group_of:
                    views = {key: _state_view(flat[lo:hi], st.buffer, j) for key, flat in st.tensors.items()}
                    self.state[p] = {"step": st.step[j], **views}
        with torch.no_grad():
            for p, old in previous.items():
                new = self.state[p]
                if all(value.numel() == new[key].numel() for key, value in old.items() if key in new):
                    for key in old.keys() & new.keys():
                        _copy_state(new[key], old[key])
        for st in self.flat_states:
            now = _marks(st.buffer)
            st.marks = [m if id(p) in recast else left.get(id(p), m) for p, m in zip(st.buffer.owners, now)]

    def _new_state(self, buf: FlatBuffer, group_of: dict[int, int]) -> FlatState:
        n, device = buf.data.numel(), buf.device
        tensors = {
            name: torch.zeros(n, dtype=dtype or buf.dtype, device=device)
            for name, dtype in self.state_dtypes.items()
        }
        if buf.dtype in LOW_PRECISION and self.master_weights is not False:
            tensors[MASTER] = buf.data.to(torch.float32)
        return FlatState(
            buffer=buf,
            tensors=tensors,
            step=torch.zeros(buf.num_segments, dtype=torch.float32, device=device),
            groups=tuple(group_of.get(id(p), -1) for p in buf.owners),
        )


def _marks(buf: FlatBuffer) -> list[tuple[int, int]]:
    """What changes when anyone but the optimizer writes a parameter (except in place through ``p.data``):
    ``(p.data_ptr(), p._version)``; of a DTensor parameter, its local shard as it is now."""
    buf.refresh_shards()
    return tensor_marks(buf.params)


def _state_view(flat: torch.Tensor, buf: FlatBuffer, j: int) -> torch.Tensor:
    """Segment ``j`` of a flat state tensor as ``optimizer.state`` shows it: in the parameter's shape, a
    DTensor like the parameter when that is one (its local part being the segment)."""
    view = flat.view(buf.shapes[j])
    return Sharding.state_view(view, buf.owners[j]) if buf.sharded else view


def _copy_state(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target <- value`` for one state entry: a whole tensor into a DTensor's local part is split as the
    DTensor is; a DTensor into a DTensor is copied (resharded) by DTensor."""
    if is_dtensor(target) and not is_dtensor(value):
        target._local_tensor.copy_(Sharding.local_piece(value.reshape(target.shape), target))
    else:
        target.copy_(value.reshape(target.shape))


def _default_names(g: int, group: dict[str, Any]) -> list[str]:
    return [f"group{g}.param{i}" for i in range(len(group["params"]))]


def real_value(value: float | torch.Tensor) -> float:
    """A hyper-parameter as a Python float (a CPU scalar tensor is read on the host)."""
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def check_real(where: str, name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """Check one real hyper-parameter (a number or a one-element CPU tensor, as torch.optim accepts for lr):
    ``TypeError`` for the wrong kind, ``ValueError`` for a value outside ``ok``, naming ``where + name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}{name}: expected a 1-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise TypeError(
                f"{where}{name}: expected a float or a CPU scalar tensor, got one on {value.device}"
            )
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name}: expected {expected}, got {value!r}")
    if not ok(real_value(value)):
        raise ValueError(f"{where}{name}: expected {expected}, got {value!r}")
