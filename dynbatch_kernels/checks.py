"""Argument checks shared by the ops: each error names the argument, what was expected and what was given."""

from __future__ import annotations

import torch

from dynbatch_kernels.chunks import ChunkTable

#: Flat buffers must start on a 16-byte boundary: the kernels load 16-byte vectors.
ALIGNMENT = 16
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if not torch.compiler.is_compiling() and tensor.numel() and tensor.data_ptr() % ALIGNMENT:
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
    if torch.compiler.is_compiling() or not tensor.numel():
        return  # pointers are not traceable; eager calls check them
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
    CUDA); pass the layout's ``chunks`` to skip that per call.
    """
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets: expected an int64 tensor, got {type(offsets).__name__}")
    if chunks is None:
        chunks = ChunkTable.from_offsets(offsets, device=buffer.device)  # validates offsets
    elif not isinstance(chunks, ChunkTable):
        raise TypeError(f"chunks: expected a ChunkTable, got {type(chunks).__name__}")
    elif offsets is not chunks.offsets and (
        torch.compiler.is_compiling() or offsets.data_ptr() != chunks.offsets.data_ptr()
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
