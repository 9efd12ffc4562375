"""The op surface: one public function per fused op over flat buffers.

Each function checks its arguments (raising before anything is written), then runs its op: the backend
chosen by :mod:`dynbatch_kernels.backends` (Triton on CUDA, C++ on CPU, or the reference). Every op is
registered as a ``torch.ops.dynbatch`` custom op with a fake implementation, which ``torch.compile``
traces without a graph break; eager calls skip the registered op's Python dispatch (see :func:`fused_op`).

One module per op family holds its ops' checks, custom ops, fake implementations and docstrings:
:mod:`.accumulate`, :mod:`.extrap` and :mod:`.lamb` (with ``segment_sq_norms``). The table columns are
defined in :mod:`dynbatch_kernels.columns` and re-exported here.
"""

from dynbatch_kernels.columns import (
    ACC_DOT,
    ACC_NEW_SQ,
    ACC_OLD_SQ,
    EXTRAP_ACTIVE,
    EXTRAP_GAMMA,
    EXTRAP_LR,
    EXTRAP_MOMENTUM,
    EXTRAP_NESTEROV,
    EXTRAP_WEIGHT_DECAY,
    GRAD_SQ,
    LAMB_ACTIVE,
    LAMB_ADAPT,
    LAMB_BETA1,
    LAMB_BETA2,
    LAMB_BIAS_CORRECTION,
    LAMB_EPS,
    LAMB_G_SQ,
    LAMB_LR,
    LAMB_MAX_GRAD_NORM,
    LAMB_RATIO,
    LAMB_RATIO_MAX,
    LAMB_RATIO_MIN,
    LAMB_U_SQ,
    LAMB_W_SQ,
    LAMB_WEIGHT_DECAY,
    NUM_ACC_SUMS,
    NUM_EXTRAP_HYPER,
    NUM_LAMB_HYPER,
    NUM_LAMB_STATS,
)
from dynbatch_kernels.ops.accumulate import accumulate_
from dynbatch_kernels.ops.extrap import extrap_hyper_row, extrap_step_, extrapolate_
from dynbatch_kernels.ops.lamb import (
    lamb_apply_,
    lamb_grad_sq_norm,
    lamb_hyper_row,
    lamb_step_,
    lamb_update_,
    segment_sq_norms,
)
from dynbatch_kernels.ops.registry import fused_op

__all__ = [
    "ACC_DOT",
    "ACC_NEW_SQ",
    "ACC_OLD_SQ",
    "EXTRAP_ACTIVE",
    "EXTRAP_GAMMA",
    "EXTRAP_LR",
    "EXTRAP_MOMENTUM",
    "EXTRAP_NESTEROV",
    "EXTRAP_WEIGHT_DECAY",
    "GRAD_SQ",
    "LAMB_ACTIVE",
    "LAMB_ADAPT",
    "LAMB_BETA1",
    "LAMB_BETA2",
    "LAMB_BIAS_CORRECTION",
    "LAMB_EPS",
    "LAMB_G_SQ",
    "LAMB_LR",
    "LAMB_MAX_GRAD_NORM",
    "LAMB_RATIO",
    "LAMB_RATIO_MAX",
    "LAMB_RATIO_MIN",
    "LAMB_U_SQ",
    "LAMB_WEIGHT_DECAY",
    "LAMB_W_SQ",
    "NUM_ACC_SUMS",
    "NUM_EXTRAP_HYPER",
    "NUM_LAMB_HYPER",
    "NUM_LAMB_STATS",
    "accumulate_",
    "extrap_hyper_row",
    "extrap_step_",
    "extrapolate_",
    "fused_op",
    "lamb_apply_",
    "lamb_grad_sq_norm",
    "lamb_hyper_row",
    "lamb_step_",
    "lamb_update_",
    "segment_sq_norms",
]
