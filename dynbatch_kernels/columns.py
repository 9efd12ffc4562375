"""Column indices of the ops' per-segment tables: the one Python home of these numbers.

Imports nothing from the package, so the ops, the reference and the Triton kernels can all read it.
``csrc/columns.h`` holds the C++ copy; the extension exports it as ``dynbatch_kernels._C.COLUMNS`` and
``tests/test_columns.py`` checks that both agree.
"""

#: Columns of the ``[S, 4]`` sums returned by ``ops.accumulate_``.
ACC_DOT, GRAD_SQ, ACC_OLD_SQ, ACC_NEW_SQ = range(4)
NUM_ACC_SUMS = 4

#: Columns of the ``[S, NUM_EXTRAP_HYPER]`` hyper-parameter table of ``ops.extrapolate_`` and
#: ``ops.extrap_step_``.
EXTRAP_LR, EXTRAP_GAMMA, EXTRAP_MOMENTUM, EXTRAP_WEIGHT_DECAY, EXTRAP_NESTEROV, EXTRAP_ACTIVE = range(6)
NUM_EXTRAP_HYPER = 6

#: Columns of the ``[S, NUM_LAMB_HYPER]`` hyper-parameter table of ``ops.lamb_step_``.
(
    LAMB_LR,
    LAMB_BETA1,
    LAMB_BETA2,
    LAMB_EPS,
    LAMB_WEIGHT_DECAY,
    LAMB_RATIO_MIN,
    LAMB_RATIO_MAX,
    LAMB_ADAPT,
    LAMB_BIAS_CORRECTION,
    LAMB_MAX_GRAD_NORM,
    LAMB_ACTIVE,
) = range(11)
NUM_LAMB_HYPER = 11

#: Columns of the ``[S, NUM_LAMB_STATS]`` statistics returned by ``ops.lamb_step_``.
LAMB_W_SQ, LAMB_U_SQ, LAMB_G_SQ, LAMB_RATIO = range(4)
NUM_LAMB_STATS = 4
