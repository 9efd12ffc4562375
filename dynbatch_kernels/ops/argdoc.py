"""The argument descriptions every op shares, written once and filled into each op's docstring."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: ``{name}`` in an op's docstring is replaced by ``ARG_DOCS[name]`` (so other braces must be doubled).
ARG_DOCS = {
    "offsets": (
        "int64 segment table, ``S+1`` non-decreasing entries from 0 to the flat buffers' length; may be "
        "None when an operand is a list (each segment then starts at the next multiple of 16 elements)."
    ),
    "chunks": (
        "the layout's :class:`~dynbatch_kernels.ChunkTable` for ``offsets``; built (one host read) when "
        "omitted."
    ),
}


#: Other shared text: ``{operand}`` describes what a tensor operand may be.
SHARED_TEXT = {
    "operand": (
        "Either a flat 1-D buffer laid out by ``offsets``, or a list of one contiguous tensor per segment "
        "(any shape, ``lengths[j]`` elements), wherever each one lives: read and written in place."
    ),
}


def shared_arg_docs(fn: F) -> F:
    """Fill the shared argument descriptions into ``fn``'s docstring (left alone under ``python -OO``)."""
    if fn.__doc__:
        fn.__doc__ = fn.__doc__.format(**ARG_DOCS, **SHARED_TEXT)
    return fn
