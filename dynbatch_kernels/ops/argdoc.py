"""The argument descriptions every op shares, written once and filled into each op's docstring."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: ``{name}`` in an op's docstring is replaced by ``ARG_DOCS[name]`` (so other braces must be doubled).
ARG_DOCS = {
    "offsets": "int64 segment table, ``S+1`` non-decreasing entries from 0 to the flat buffers' length.",
    "chunks": (
        "the layout's :class:`~dynbatch_kernels.ChunkTable` for ``offsets``; built (one host read) when "
        "omitted."
    ),
}


def shared_arg_docs(fn: F) -> F:
    """Fill the shared argument descriptions into ``fn``'s docstring (left alone under ``python -OO``)."""
    if fn.__doc__:
        fn.__doc__ = fn.__doc__.format(**ARG_DOCS)
    return fn
