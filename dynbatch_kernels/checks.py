"""Argument checks shared by the ops: each error names the argument, what was expected and what was given."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from dynbatch_kernels.chunks import ChunkTable

#: Flat buffers must start on a 16-byte boundary: the kernels load 16-byte vectors.
ALIGNMENT = 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Chunk tables kept for calls without ``chunks=`` (one per offsets tensor, version and device).
CACHED_TABLES = 8
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_EAGER_ARGS = frozenset((*_PLAIN, bool, int, float, type(None)))
_tables: OrderedDict[tuple, tuple[weakref.ref, ChunkTable]] = OrderedDict()


def has_memory(*tensors: torch.Tensor) -> bool:
    """The tensors' pointers are real: plain tensors (no fake or functional subclass), not being traced by
    ``torch.compile``."""
    return not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in tensors)


def eager(*args: object) -> bool:
    """Plain eager mode: nothing traces or intercepts a call on ``args``, so it may skip the dispatcher.

    False while ``torch.compile`` traces, under any dispatch mode (``FakeTensorMode``, ``make_fx``,
    schema checks) or torch-function mode, and when a tensor among ``args`` is a subclass (fake,
    functional). About 1 us for a dozen arguments.
    """
    if (
        torch.compiler.is_compiling()  # first: Dynamo cannot trace the two calls after it
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    return all(type(arg) in _EAGER_ARGS or not isinstance(arg, torch.Tensor) for arg in args)


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


def check_disjoint(*named: tuple[str, torch.Tensor]) -> None:
    """Every buffer has the first one's length and device, and no two overlap."""
    for k, (name, tensor) in enumerate(named[1:], 1):
        for like_name, like in named[:k]:
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


def chunk_table_for(offsets: torch.Tensor, buffer: torch.Tensor, chunks: ChunkTable | None) -> ChunkTable:
    """The chunk table for ``offsets`` over ``buffer``: the given one (checked cheaply) or a new one.

    Building a table reads ``offsets`` on the host (a graph break under ``torch.compile``, a device sync on
    CUDA); eager calls keep the last few built (see :func:`cached_table`), and the layout's ``chunks``
    skips even the look-up.
    """
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets: expected an int64 tensor, got {type(offsets).__name__}")
    if chunks is None:
        chunks = cached_table(offsets, buffer.device)
    elif not isinstance(chunks, ChunkTable):
        raise TypeError(f"chunks: expected a ChunkTable, got {type(chunks).__name__}")
    elif offsets is not chunks.offsets and (
        not has_memory(offsets, chunks.offsets) or offsets.data_ptr() != chunks.offsets.data_ptr()
    ):
        raise ValueError("chunks: expected the table built for these offsets (its .offsets tensor)")
    if offsets.dim() != 1 or offsets.numel() != chunks.num_segments + 1:
        raise ValueError(
            f"offsets: expected {chunks.num_segments + 1} entries like the chunk table, "
            f"got shape {tuple(offsets.shape)}"
        )
    if chunks.num_elements != buffer.numel():
        raise ValueError(
            f"offsets: expected the last entry to equal the buffer length {buffer.numel()}, "
            f"got {chunks.num_elements}"
        )
    if chunks.starts.device != buffer.device:
        raise ValueError(f"chunks: expected device {buffer.device}, got {chunks.starts.device}")
    return chunks


def cached_table(offsets: torch.Tensor, device: torch.device) -> ChunkTable:
    """The chunk table of ``offsets`` on ``device``, built (and ``offsets`` validated) once per version.

    Keyed on the tensor itself (held weakly: a new tensor at a freed one's address is a miss), its
    ``_version`` (bumped by every in-place write, through views too), address, length and device. Writes
    that bypass the version counter (through ``.data`` or raw pointers) are not seen: pass ``chunks=``.
    """
    if not eager(offsets):
        return ChunkTable.from_offsets(offsets, device=device)
    key = (id(offsets), offsets._version, offsets.data_ptr(), offsets.numel(), offsets.device, device)
    hit = _tables.get(key)
    if hit is not None and hit[0]() is offsets:
        _tables.move_to_end(key)
        return hit[1]
    table = ChunkTable.from_offsets(offsets, device=device)  # validates offsets
    _tables[key] = (weakref.ref(offsets), table)
    while len(_tables) > CACHED_TABLES:
        _tables.popitem(last=False)
    return table


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
