"""The Triton backend: one file per fused op, each holding its kernel and launcher."""

from dynbatch_kernels.triton.accumulate import accumulate_
from dynbatch_kernels.triton.extrap import extrap_step_, extrapolate_
from dynbatch_kernels.triton.lamb import lamb_apply_, lamb_step_, lamb_update_, segment_sq_norms

__all__ = ["accumulate_", "extrap_step_", "extrapolate_"]
__all__ += ["lamb_apply_", "lamb_step_", "lamb_update_", "segment_sq_norms"]
