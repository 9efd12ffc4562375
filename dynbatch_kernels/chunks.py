"""The chunk table: how every kernel cuts a segmented flat buffer into work items.

Segment ``j`` of a flat buffer covers ``[offsets[j], offsets[j+1])``. Each segment is cut into chunks of
at most ``chunk_size`` elements that never cross a segment boundary, so one program (Triton) or one task
(C++) owns one chunk, writes its partial sums to row ``c`` of a ``[num_chunks, k]`` float32 buffer, and a
second small pass sums each segment's rows in chunk order. No float atomics: bit-identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Elements per chunk. 8192 float32 elements (32 KiB) keep a chunk in L1/L2 on the CPU and give a GPU
#: 2048 programs at 2**24 elements, enough to fill an H100's 132 SMs several times over.
CHUNK_SIZE = 8192
#: Elements every chunk bound of an aligned table is a multiple of: 16 bytes or more for every dtype, so
#: the kernels can load and store whole 16-byte vectors.
ALIGN = 16


@dataclass(frozen=True)
class ChunkTable:
    """Work items over one segmented flat buffer; built once per layout, on the buffer's device.

    ``offsets``: the validated segment table; ``starts[c]``/``ends[c]``: the element range of chunk
    ``c``; ``segment_chunks[j]`` to ``segment_chunks[j+1]``: the chunks of segment ``j``;
    ``chunk_segments[c]``: the segment of chunk ``c`` (for per-segment hyper-parameters). ``aligned``:
    every bound is a multiple of :data:`ALIGN` elements (true for a ``FlatLayout`` with the default
    ``align=16``), which lets the Triton kernels use 16-byte accesses.
    """

    offsets: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    segment_chunks: torch.Tensor
    chunk_segments: torch.Tensor
    num_elements: int
    chunk_size: int
    aligned: bool = False

    @property
    def num_segments(self) -> int:
        return self.segment_chunks.numel() - 1

    @property
    def num_chunks(self) -> int:
        return self.starts.numel()

    def op_args(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
        """The table as custom-op arguments: ``offsets, starts, ends, segment_chunks, chunk_segments,
        chunk_size, aligned`` (the inverse of :meth:`from_op_args`)."""
        return (
            self.offsets,
            self.starts,
            self.ends,
            self.segment_chunks,
            self.chunk_segments,
            self.chunk_size,
            self.aligned,
        )

    @classmethod
    def from_op_args(
        cls,
        num_elements: int,
        offsets: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        segment_chunks: torch.Tensor,
        chunk_segments: torch.Tensor,
        chunk_size: int,
        aligned: bool,
    ) -> ChunkTable:
        return cls(offsets, starts, ends, segment_chunks, chunk_segments, num_elements, chunk_size, aligned)

    @classmethod
    def from_offsets(
        cls,
        offsets: torch.Tensor | list[int],
        device: torch.device | str | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> ChunkTable:
        """Validate ``offsets`` (read on the host once) and cut every segment into chunks."""
        host = validate_offsets(offsets)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
        if device is None:
            device = offsets.device if isinstance(offsets, torch.Tensor) else "cpu"
        lengths = host.diff()
        per_segment = (lengths + chunk_size - 1) // chunk_size
        segment_chunks = torch.cat([torch.zeros(1, dtype=torch.int64), per_segment.cumsum(0)])
        segment_of_chunk = torch.repeat_interleave(torch.arange(lengths.numel()), per_segment)
        rank_in_segment = torch.arange(int(segment_chunks[-1])) - segment_chunks[segment_of_chunk]
        starts = host[segment_of_chunk] + rank_in_segment * chunk_size
        ends = torch.minimum(starts + chunk_size, host[segment_of_chunk + 1])
        return cls(
            offsets=host.to(device),
            starts=starts.to(device),
            ends=ends.to(device),
            segment_chunks=segment_chunks.to(device),
            chunk_segments=segment_of_chunk.to(device),
            num_elements=int(host[-1]),
            chunk_size=chunk_size,
            aligned=chunk_size % ALIGN == 0 and not bool((host % ALIGN).any()),
        )


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
