"""The op surface, split into per-op modules: the same names, whole docstrings, the same custom ops."""

from __future__ import annotations

import inspect

import torch

from dynbatch_kernels import ops
from dynbatch_kernels.ops.argdoc import ARG_DOCS

OPS = ("accumulate_", "extrapolate_", "extrap_step_", "segment_sq_norms", "lamb_step_", "lamb_grad_sq_norm")


def test_every_public_name_is_importable_from_ops():
    for name in ops.__all__:
        assert hasattr(ops, name), name
    assert {*OPS, "extrap_hyper_row", "lamb_hyper_row", "fused_op"} <= set(ops.__all__)


def test_the_custom_ops_keep_their_names():
    for name in ("accumulate_", "extrapolate_", "extrap_step_", "segment_sq_norms", "lamb_step_"):
        assert hasattr(torch.ops.dynbatch, name), name


def test_op_docstrings_carry_the_shared_argument_text():
    for name in OPS:
        doc = inspect.getdoc(getattr(ops, name))
        assert "{" not in doc, name  # every placeholder filled
        for arg, text in ARG_DOCS.items():
            assert f"{arg}: {text}" in doc, (name, arg)
