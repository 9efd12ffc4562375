"""Argument checks shared by the ops: each error names the argument, what was expected and what was given."""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from dynbatch_kernels.available import cpp_available
from dynbatch_kernels.chunks import ALIGN, ChunkTable, virtual_bases

#: Flat buffers must start on a 16-byte boundary: the kernels load 16-byte vectors.
ALIGNMENT = 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Chunk tables kept for calls without ``chunks=`` (one per offsets tensor, version and device).
CACHED_TABLES = 8
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_EAGER_ARGS = frozenset((*_PLAIN, bool, int, float, type(None)))
_tables: OrderedDict[tuple, tuple[weakref.ref, ChunkTable]] = OrderedDict()
#: A tensor operand: one flat buffer laid out by ``offsets``, or one tensor per segment, wherever it lives.
Operand = torch.Tensor | Sequence[torch.Tensor]


def has_memory(*tensors: torch.Tensor) -> bool:
    """The tensors' pointers are real: plain tensors (no fake or functional subclass), not being traced by
    ``torch.compile``."""
    return not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in tensors)


def eager(*args: object) -> bool:
    """Plain eager mode: nothing traces or intercepts a call on ``args``, so it may skip the dispatcher.

    False while ``torch.compile`` traces, under any dispatch mode (``FakeTensorMode``, ``make_fx``,
    schema checks) or torch-function mode, and when a tensor among ``args`` is a subclass (fake,
    functional, DTensor), the first tensor of a list argument included (a list holds one kind of tensor).
    About 1 us for a dozen arguments.
    """
    if (
        torch.compiler.is_compiling()  # first: Dynamo cannot trace the two calls after it
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    firsts = (arg[0] if isinstance(arg, list) and arg else arg for arg in args)
    return all(type(arg) in _EAGER_ARGS or not isinstance(arg, torch.Tensor) for arg in firsts)


def check_flat(name: str, tensor: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A contiguous, 16-byte aligned 1-D tensor of one of ``dtypes``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {tensor.dtype}")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense strided tensor, got layout {tensor.layout}")
    if tensor.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D flat buffer, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got stride {tensor.stride()}")
    if tensor.numel() and has_memory(tensor) and tensor.data_ptr() % ALIGNMENT:
        raise ValueError(
            f"{name}: expected a {ALIGNMENT}-byte aligned buffer, got data_ptr % {ALIGNMENT} = "
            f"{tensor.data_ptr() % ALIGNMENT}"
        )
    return tensor


def check_same(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``tensor`` has ``like``'s length and device and does not overlap it."""
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} like {like_name}, got {tensor.device}")
    if tensor.numel() != like.numel():
        raise ValueError(f"{name}: expected {like.numel()} elements like {like_name}, got {tensor.numel()}")
    if not tensor.numel() or not has_memory(tensor, like):
        return  # no pointers to compare while tracing; eager calls check them
    if tensor.untyped_storage().data_ptr() == like.untyped_storage().data_ptr():
        lo, hi = sorted((tensor, like), key=lambda t: t.data_ptr())
        if lo.data_ptr() + lo.numel() * lo.element_size() > hi.data_ptr():
            raise ValueError(f"{name}: must not overlap {like_name} in memory")


def check_disjoint(*named: tuple[str, object]) -> None:
    """No two flat buffers among the operands overlap, and each has the first one's length and device.

    List operands are skipped: their tensors are checked one by one by the backend (overlap between the
    tensors of different lists is the caller's responsibility).
    """
    flats = [(name, op) for name, op in named if isinstance(op, torch.Tensor)]
    for k, (name, tensor) in enumerate(flats[1:], 1):
        for like_name, like in flats[:k]:
            check_same(name, tensor, like_name, like)


def check_device_scalar(name: str, tensor: object, like: torch.Tensor) -> None:
    """None, or a one-element float32 tensor on ``like``'s device."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a one-element float32 tensor or None, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32 or tensor.numel() != 1:
        raise TypeError(
            f"{name}: expected a one-element float32 tensor, got {tensor.numel()} elements of {tensor.dtype}"
        )
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {tensor.device}")


def as_operand(name: str, operand: object, dtypes: tuple[torch.dtype, ...]) -> list[torch.Tensor]:
    """An operand as the backends take it: ``[flat]`` for a flat buffer (checked by :func:`check_flat`),
    else the list of per-segment tensors. Only the first tensor of a list is checked here (its dtype);
    the backend checks them all (:func:`segment_addresses`) in the same pass that reads their addresses.
    """
    if isinstance(operand, torch.Tensor):
        return [check_flat(name, operand, dtypes)]
    if not isinstance(operand, (list, tuple)):
        raise TypeError(
            f"{name}: expected a flat tensor or a list of per-segment tensors, got {type(operand).__name__}"
        )
    if operand:
        first = operand[0]
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"{name}: expected a list of tensors, got a {type(first).__name__} in it")
        if first.dtype not in dtypes:
            names = ", ".join(str(d) for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {first.dtype}")
    return list(operand)


def operand_device(operand: list[torch.Tensor], default: torch.device) -> torch.device:
    return operand[0].device if operand else default


def table_for(
    offsets: torch.Tensor | None,
    operands: Sequence[tuple[str, object, list[torch.Tensor]]],
    chunks: ChunkTable | None,
) -> ChunkTable:
    """The chunk table every operand is laid out by: ``chunks`` (checked cheaply) or one built from
    ``offsets`` and, when an operand is a list, its tensors' lengths (cached, see :func:`cached_table`).

    ``operands``: ``(name, as given, as_operand(...))`` triples. Without ``offsets`` and ``chunks``, each
    segment starts on the first multiple of :data:`ALIGN` elements after the previous one. A flat operand
    must span the table; a list operand has one tensor per segment (each one checked by the backend).
    """
    device = next((op[0].device for _, _, op in operands if op), torch.device("cpu"))
    lengths = None
    if chunks is None:  # the lengths of the first list operand (the backend checks every list's)
        segments = next((op for _, given, op in operands if not isinstance(given, torch.Tensor)), None)
        lengths = None if segments is None else tuple(t.numel() for t in segments)
    if chunks is not None:
        if not isinstance(chunks, ChunkTable):
            raise TypeError(f"chunks: expected a ChunkTable, got {type(chunks).__name__}")
        if (
            offsets is not None
            and offsets is not chunks.offsets
            and (not has_memory(offsets, chunks.offsets) or offsets.data_ptr() != chunks.offsets.data_ptr())
        ):
            raise ValueError("chunks: expected the table built for these offsets (its .offsets tensor)")
        if chunks.starts.device != device:
            raise ValueError(f"chunks: expected device {device}, got {chunks.starts.device}")
    elif offsets is None:
        if lengths is None:
            raise ValueError("offsets: required when no operand is a list of per-segment tensors")
        padded = torch.tensor([0, *(-(-n // ALIGN) * ALIGN for n in lengths)]).cumsum(0)
        chunks = ChunkTable.from_offsets(padded, device=device, lengths=lengths)  # a new tensor: no cache
    else:
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets: expected an int64 tensor, got {type(offsets).__name__}")
        chunks = cached_table(offsets, device, lengths)
    if offsets is not None and (offsets.dim() != 1 or offsets.numel() != chunks.num_segments + 1):
        raise ValueError(
            f"offsets: expected {chunks.num_segments + 1} entries like the chunk table, "
            f"got shape {tuple(offsets.shape)}"
        )
    for name, given, op in operands:
        if isinstance(given, torch.Tensor):
            if given.numel() != chunks.num_elements:
                raise ValueError(
                    f"offsets: expected the last entry to equal the {name} buffer length {given.numel()}, "
                    f"got {chunks.num_elements}"
                )
        elif len(op) != chunks.num_segments:
            raise ValueError(
                f"{name}: expected one tensor per segment ({chunks.num_segments}), got a list of {len(op)}"
            )
        if op and op[0].device != device:
            raise ValueError(f"{name}: expected device {device} like the other operands, got {op[0].device}")
    return chunks


def cached_table(
    offsets: torch.Tensor, device: torch.device, lengths: tuple[int, ...] | None = None
) -> ChunkTable:
    """The chunk table of ``offsets`` (and ``lengths``) on ``device``, built (and validated) once per
    version.

    Keyed on the tensor itself (held weakly: a new tensor at a freed one's address is a miss), its
    ``_version`` (bumped by every in-place write, through views too), address, length and device. Writes
    that bypass the version counter (through ``.data`` or raw pointers) are not seen: pass ``chunks=``.
    """
    if not eager(offsets):
        return ChunkTable.from_offsets(offsets, device=device, lengths=lengths)
    key = (
        id(offsets),
        offsets._version,
        offsets.data_ptr(),
        offsets.numel(),
        offsets.device,
        device,
        lengths,
    )
    hit = _tables.get(key)
    if hit is not None and hit[0]() is offsets:
        _tables.move_to_end(key)
        return hit[1]
    table = ChunkTable.from_offsets(offsets, device=device, lengths=lengths)  # validates offsets
    _tables[key] = (weakref.ref(offsets), table)
    while len(_tables) > CACHED_TABLES:
        _tables.popitem(last=False)
    return table


def segment_addresses(name: str, operand: list[torch.Tensor], chunks: ChunkTable) -> torch.Tensor:
    """Check every tensor of ``operand`` and return its segments' virtual base byte addresses.

    A CPU int64 ``[S]`` tensor ``base`` such that virtual element ``i`` of segment ``j`` is at byte
    ``base[j] + i * element_size``: a flat buffer's address for every segment, or
    ``tensors[j].data_ptr() - offsets[j] * element_size``. Checks that the tensors share one dtype and
    device, are contiguous and hold ``lengths[j]`` elements each; reads no device memory. In C++ when the
    extension is built (about 0.3 us per tensor, list conversion included: 4-5x the Python check's speed),
    else in Python.
    """
    try:
        if _cpp_addresses() is not None:
            return _cpp_addresses()(operand, chunks.host_offsets, chunks.host_lengths, chunks.num_elements)
        return virtual_bases(operand, chunks)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


@functools.cache
def _cpp_addresses() -> Callable | None:
    """The extension's ``segment_addresses``, or None when it is not built."""
    return getattr(torch.ops.dynbatch_cpp, "segment_addresses", None) if cpp_available() else None


def check_hyper(name: str, tensor: object, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 ``[rows, cols]`` table of per-segment values on ``like``'s device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {tensor.dtype}")
    if tuple(tensor.shape) != (rows, cols) or not tensor.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous [{rows}, {cols}] table (one row per segment), "
            f"got shape {tuple(tensor.shape)} stride {tensor.stride()}"
        )
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {tensor.device}")
    return tensor
