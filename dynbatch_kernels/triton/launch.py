"""What every launcher shares: operand address tables, chunk bounds, the device guard, alignment hints.

Operands reach the kernels as per-segment address tables (int64 ``[S]``, on the operands' device): virtual
element ``i`` of segment ``j`` is at byte ``table[j] + i * element_size``, whether the operand is one flat
buffer (its address, ``S`` times) or one tensor per segment living anywhere
(:func:`dynbatch_kernels.checks.segment_addresses`). A kernel program turns its chunk's entry into a typed
pointer to the chunk's first element (:func:`chunk_pointer`) and indexes it from 0.

A masked load or store becomes one 16-byte access per thread only when the compiler can prove its
addresses 16-byte aligned and its mask constant over the vector. Neither a loaded address nor a loaded
chunk bound is, unless marked: the launchers pass ``ALIGNED`` when the chunk table is aligned (every
bound a multiple of :data:`~dynbatch_kernels.chunks.ALIGN` elements) and every operand's virtual bases
are 16-byte aligned; the kernels then mark the chunk pointers and bounds, run their 16-byte vector loop
over ``[start, body_ends[c])`` and one scalar step of :data:`ALIGN` elements over the tail
``[body_ends[c], ends[c])``. Otherwise they get the scalar variant, whose loop covers the whole chunk.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from dynbatch_kernels.available import triton_interpreted
from dynbatch_kernels.checks import segment_addresses
from dynbatch_kernels.chunks import ALIGN, ChunkTable

#: Bytes every address of an aligned variant is a multiple of (one vector access).
VECTOR_BYTES = 16
#: Device address tables kept, per device and stream (keyed on their contents).
CACHED_ADDRESS_TABLES = 64
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_ALIGN: tl.constexpr = tl.constexpr(ALIGN)
#: Elements of the scalar step after an aligned chunk's vector body (its tail is shorter than ALIGN).
TAIL: tl.constexpr = tl.constexpr(ALIGN)
_VECTOR_BYTES: tl.constexpr = tl.constexpr(VECTOR_BYTES)
#: (device, stream, length, fingerprint) -> (host table, device table).
_device_tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
F = TypeVar("F", bound=Callable)


@triton.jit
def load_bound(pointer, ALIGNED: tl.constexpr):
    """Load a chunk bound, marked as a multiple of ``ALIGN`` elements when ``ALIGNED``.

    The mark must sit on the load itself (a hint on a value passed into a function is lost when the
    function is inlined); ``tl.where`` of two marked bounds keeps the mark.
    """
    bound = tl.load(pointer)
    if ALIGNED:
        bound = tl.multiple_of(bound, _ALIGN)
    return bound


@triton.jit
def chunk_extent(starts_ptr, ends_ptr, body_ends_ptr, chunk, ALIGNED: tl.constexpr):
    """``(start, body, count)`` of a chunk: its first virtual index, the length of its vector body
    (a marked multiple of ``ALIGN`` when ``ALIGNED``; the whole chunk otherwise) and its length."""
    start = load_bound(starts_ptr + chunk, ALIGNED)
    end = tl.load(ends_ptr + chunk)
    body = load_bound(body_ends_ptr + chunk, ALIGNED) - start if ALIGNED else end - start
    return start, body, end - start


@triton.jit
def chunk_pointer(table, seg, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A ``DTYPE`` pointer to virtual element ``start`` of segment ``seg`` of an address table.

    The mark sits on the pointer arithmetic, not on the loaded address: Triton's alignment analysis
    does not see through an int-to-pointer cast. Sound when ``ALIGNED``: the address is 16-byte aligned
    and ``start`` a multiple of ``ALIGN`` elements.
    """
    pointer = tl.load(table + seg).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        pointer = tl.multiple_of(pointer, _VECTOR_BYTES)
    return pointer


def tl_dtype(name: str, operand: list[torch.Tensor]) -> tl.dtype:
    """The Triton element type of an operand (float32 for an empty list: nothing is launched)."""
    if not operand:
        return tl.float32
    dtype = TL_DTYPES.get(operand[0].dtype)
    if dtype is None:
        raise TypeError(f"{name}: expected dtype in {tuple(TL_DTYPES)}, got {operand[0].dtype}")
    return dtype


def address_table(name: str, operand: list[torch.Tensor], chunks: ChunkTable) -> tuple[torch.Tensor, bool]:
    """``operand``'s virtual base addresses as an int64 ``[S]`` table on its device, and whether every
    segment with elements has a 16-byte aligned one.

    The tensors are checked and their addresses read on the host (:func:`segment_addresses`); a CUDA
    table is copied from pinned memory without a device sync, and only when its contents are new on
    that device and stream (the last :data:`CACHED_ADDRESS_TABLES` are kept).
    """
    host = segment_addresses(name, operand, chunks)
    aligned = not bool(((host % VECTOR_BYTES != 0) & (chunks.host_lengths > 0)).any())
    device = operand[0].device if operand else chunks.starts.device
    if device.type != "cuda":
        return host, aligned
    stream = torch.cuda.current_stream(device).stream_id
    key = (device, stream, host.numel(), int(host.sum()), int(host[::7].sum()))
    hit = _device_tables.get(key)
    if hit is None or not torch.equal(hit[0], host):
        hit = (host.clone(), host.pin_memory().to(device, non_blocking=True))
        _device_tables[key] = hit
        while len(_device_tables) > CACHED_ADDRESS_TABLES:
            _device_tables.popitem(last=False)
    else:
        _device_tables.move_to_end(key)
    return hit[1], aligned


def operand_args(chunks: ChunkTable, *named: tuple[str, list[torch.Tensor]]) -> tuple[list, list, bool]:
    """Address tables and Triton element types of ``named`` operands, and the launch's ``ALIGNED``:
    an aligned chunk table and every operand aligned."""
    tables, dtypes, aligned = [], [], chunks.aligned
    for name, operand in named:
        table, ok = address_table(name, operand, chunks)
        tables.append(table)
        dtypes.append(tl_dtype(name, operand))
        aligned = aligned and ok
    return tables, dtypes, aligned


def on_device_of_first(launcher: F) -> F:
    """Run ``launcher`` with the CUDA device of its first operand's first tensor current (a no-op for
    CPU tensors and empty operands).

    Triton launches on the current device and its stream, so a buffer on ``cuda:1`` needs ``cuda:1``
    current even when the caller's is ``cuda:0``. Under ``TRITON_INTERPRET=1`` a CUDA call runs on host
    copies instead (:func:`_on_host`).
    """

    @functools.wraps(launcher)
    def guarded(operand: list[torch.Tensor], *args, **kwargs):
        first = operand[0] if isinstance(operand, (list, tuple)) and operand else operand
        if not isinstance(first, torch.Tensor):
            return launcher(operand, *args, **kwargs)
        if first.device.type == "cuda" and triton_interpreted():
            return _on_host(launcher, first.device, operand, *args, **kwargs)
        with torch.cuda.device_of(first):
            return launcher(operand, *args, **kwargs)

    return guarded  # type: ignore[return-value]


def _on_host(launcher: Callable, device: torch.device, *args, **kwargs):
    """``launcher`` on CPU copies of every tensor argument, the changed ones copied back, its result moved
    to ``device``.

    The interpreter runs kernels on the host and would read the address tables' device addresses there.
    One copy per tensor object keeps an operand given twice (``update=grad``) aliased; a tensor that shares
    memory with another without being the same object is copied back only if the kernel changed it.
    """
    copies: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def host(value: object) -> object:
        if isinstance(value, torch.Tensor):
            if id(value) not in copies:
                copy = value.detach().to("cpu", copy=True)
                copies[id(value)] = (value, copy, copy.clone())
            return copies[id(value)][1]
        if isinstance(value, (list, tuple)):
            return [host(item) for item in value]
        if isinstance(value, ChunkTable):
            tensors, sizes = value.op_args()
            return ChunkTable.from_op_args([host(t) for t in tensors], sizes)
        return value

    result = launcher(*host(list(args)), **{key: host(value) for key, value in kwargs.items()})
    for original, copy, before in copies.values():
        if not torch.equal(copy, before):
            original.copy_(copy)
    return result.to(device) if isinstance(result, torch.Tensor) else result
