"""The chunk table: how every kernel cuts its segments into work items.

Segment ``j`` occupies ``[offsets[j], offsets[j] + lengths[j])`` of a virtual index space (``lengths[j]``
is at most ``offsets[j+1] - offsets[j]``; the rest is padding no kernel touches). An operand is either a
flat buffer laid out in that space (element ``i`` at ``flat[i]``) or one tensor per segment (element ``i``
of segment ``j`` at ``tensors[j].view(-1)[i - offsets[j]]``), wherever each tensor lives. Each segment is
cut into chunks of at most ``chunk_size`` elements that never cross a segment boundary, so one program
(Triton) or one task (C++) owns one chunk, writes its partial sums to row ``c`` of a ``[num_chunks, k]``
float32 buffer, and a second small pass sums each segment's rows in chunk order. No float atomics:
bit-identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: Elements per chunk. 8192 float32 elements (32 KiB) keep a chunk in L1/L2 on the CPU and give a GPU
#: 2048 programs at 2**24 elements, enough to fill an H100's 132 SMs several times over.
CHUNK_SIZE = 8192
#: Elements every chunk bound of an aligned table is a multiple of: 16 bytes or more for every dtype, so
#: the kernels can load and store whole 16-byte vectors.
ALIGN = 16


@dataclass(frozen=True)
class ChunkTable:
    """Work items over one set of segments; built once per layout, on the operands' device.

    ``offsets`` (``[S+1]``) and ``lengths`` (``[S]``): where each segment sits in the virtual index space
    and how many elements of it are used; ``starts[c]``/``ends[c]``: the element range of chunk ``c``;
    ``body_ends[c]``: ``ends[c]`` rounded down to a multiple of :data:`ALIGN` elements in an aligned table
    (the kernels' 16-byte vector loop; the rest, under 16 elements, is the chunk's tail), else ``ends[c]``;
    ``segment_chunks[j]`` to ``segment_chunks[j+1]``: the chunks of segment ``j``; ``chunk_segments[c]``:
    the segment of chunk ``c`` (for per-segment hyper-parameters and addresses). ``host_offsets`` and
    ``host_lengths`` are CPU copies (the same tensors on a CPU table), so that checking an operand never
    reads the device. ``aligned``: every segment starts on a multiple of :data:`ALIGN` elements (true for
    a ``FlatLayout`` with the default ``align=16``), which lets the Triton kernels use 16-byte accesses
    on operands whose addresses are 16-byte aligned.
    """

    offsets: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    body_ends: torch.Tensor
    segment_chunks: torch.Tensor
    chunk_segments: torch.Tensor
    host_offsets: torch.Tensor
    host_lengths: torch.Tensor
    num_elements: int
    chunk_size: int
    aligned: bool = False

    @property
    def num_segments(self) -> int:
        return self.segment_chunks.numel() - 1

    @property
    def num_chunks(self) -> int:
        return self.starts.numel()

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The table as two custom-op arguments: its tensors in field order, and ``[num_elements,
        chunk_size, aligned]`` (the inverse of :meth:`from_op_args`); built once per table."""
        return self._op_args

    def __post_init__(self) -> None:
        tensors = [getattr(self, f.name) for f in fields(self) if f.type == "torch.Tensor"]
        op_args = (tensors, [self.num_elements, self.chunk_size, int(self.aligned)])
        object.__setattr__(self, "_op_args", op_args)  # built once (a frozen dataclass)
        #: The table as the C++ kernels take it (``host_offsets``, ``host_lengths``, ``starts``, ``ends``,
        #: ``segment_chunks``, ``chunk_segments``: their schemas' order); built once.
        cpu_args = (
            self.host_offsets,
            self.host_lengths,
            self.starts,
            self.ends,
            self.segment_chunks,
            self.chunk_segments,
        )
        object.__setattr__(self, "cpu_args", cpu_args)

    @classmethod
    def from_op_args(cls, tensors: list[torch.Tensor], sizes: list[int]) -> ChunkTable:
        num_elements, chunk_size, aligned = sizes
        return cls(*tensors, num_elements, chunk_size, bool(aligned))

    @classmethod
    def from_offsets(
        cls,
        offsets: torch.Tensor | list[int],
        device: torch.device | str | None = None,
        chunk_size: int = CHUNK_SIZE,
        lengths: torch.Tensor | list[int] | None = None,
    ) -> ChunkTable:
        """Validate ``offsets`` (read on the host once) and cut every segment into chunks.

        ``lengths`` (default: the whole of each segment, ``offsets.diff()``) leaves the rest of each
        segment, up to the next offset, untouched: the padding of a ``FlatLayout`` whose parameters live
        elsewhere.
        """
        host = validate_offsets(offsets)
        room = host.diff()
        used = room if lengths is None else validate_lengths(lengths, room)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
        if device is None:
            device = offsets.device if isinstance(offsets, torch.Tensor) else "cpu"
        aligned = chunk_size % ALIGN == 0 and not bool((host % ALIGN).any())
        per_segment = (used + chunk_size - 1) // chunk_size
        segment_chunks = torch.cat([torch.zeros(1, dtype=torch.int64), per_segment.cumsum(0)])
        segment_of_chunk = torch.repeat_interleave(torch.arange(used.numel()), per_segment)
        rank_in_segment = torch.arange(int(segment_chunks[-1])) - segment_chunks[segment_of_chunk]
        starts = host[segment_of_chunk] + rank_in_segment * chunk_size
        ends = torch.minimum(starts + chunk_size, host[segment_of_chunk] + used[segment_of_chunk])
        body_ends = starts + (ends - starts) // ALIGN * ALIGN if aligned else ends
        on_device = lambda t: t.to(device)
        return cls(
            offsets=on_device(host),
            lengths=on_device(used),
            starts=on_device(starts),
            ends=on_device(ends),
            body_ends=on_device(body_ends),
            segment_chunks=on_device(segment_chunks),
            chunk_segments=on_device(segment_of_chunk),
            host_offsets=host,
            host_lengths=used,
            num_elements=int(host[-1]),
            chunk_size=chunk_size,
            aligned=aligned,
        )


def validate_lengths(lengths: torch.Tensor | list[int], room: torch.Tensor) -> torch.Tensor:
    """Check the used length of every segment (``0 <= lengths[j] <= room[j]``); a CPU int64 tensor."""
    host = torch.as_tensor(lengths, dtype=torch.int64).detach().cpu().reshape(-1)
    if host.numel() != room.numel():
        raise ValueError(f"lengths: expected {room.numel()} entries (one per segment), got {host.numel()}")
    bad = ((host < 0) | (host > room)).nonzero()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"lengths: expected 0 <= lengths[j] <= offsets[j+1] - offsets[j], got lengths[{j}]="
            f"{int(host[j])} with room for {int(room[j])}"
        )
    return host


def validate_offsets(offsets: torch.Tensor | list[int]) -> torch.Tensor:
    """Check a segment table and return it as a CPU int64 tensor.

    A valid table is 1-D int64, starts at 0 and never decreases; its last entry is the buffer's length.
    """
    if isinstance(offsets, torch.Tensor):
        if offsets.dtype != torch.int64 or offsets.dim() != 1:
            raise TypeError(f"offsets: expected a 1-D int64 tensor, got {offsets.dim()}-D {offsets.dtype}")
        host = offsets.detach().cpu()
    else:
        host = torch.tensor(list(offsets), dtype=torch.int64)
    if host.numel() == 0 or int(host[0]) != 0:
        raise ValueError(f"offsets: expected a table starting at 0, got {host[:4].tolist()}...")
    if bool((host.diff() < 0).any()):
        bad = int((host.diff() < 0).nonzero()[0])
        raise ValueError(
            f"offsets: expected non-decreasing entries, got offsets[{bad}]={int(host[bad])} > "
            f"offsets[{bad + 1}]={int(host[bad + 1])}"
        )
    return host


def virtual_bases(operand: list[torch.Tensor], chunks: ChunkTable) -> torch.Tensor:
    """The operand's checked virtual base byte addresses (see ``checks.segment_addresses``), in Python."""
    segments = chunks.num_segments
    if len(operand) == 1 and operand[0].numel() == chunks.num_elements:
        (flat,) = operand
        if not flat.is_contiguous():
            raise ValueError(f"expected a contiguous buffer, got stride {flat.stride()}")
        return torch.full((segments,), flat.data_ptr(), dtype=torch.int64)
    if len(operand) != segments:
        raise ValueError(f"expected {segments} tensors (one per segment), got {len(operand)}")
    if not operand:
        return torch.zeros(0, dtype=torch.int64)
    first = operand[0]
    for j, (tensor, length) in enumerate(zip(operand, chunks.host_lengths.tolist())):
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise TypeError(
                f"segment {j}: expected {first.dtype} on {first.device} like segment 0, "
                f"got {tensor.dtype} on {tensor.device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"segment {j}: expected a contiguous tensor, got stride {tensor.stride()}")
        if tensor.numel() != length:
            raise ValueError(f"segment {j}: expected {length} elements, got {tensor.numel()}")
    pointers = torch.tensor([t.data_ptr() for t in operand], dtype=torch.int64)
    return pointers - chunks.host_offsets[:-1] * first.element_size()
