// Column indices of the ops' per-segment tables: the C++ copy of dynbatch_kernels/columns.py.
//
// registration.cpp exports kExported as dynbatch_kernels._C.COLUMNS, and tests/test_columns.py checks it
// against the Python module, so the two cannot drift apart unnoticed. Add a column here, to kExported and
// to columns.py together.
#pragma once

#include <cstdint>

namespace dynbatch::columns {

// accumulate_'s per-segment sums (ACC_DOT, GRAD_SQ, ACC_OLD_SQ, ACC_NEW_SQ).
namespace acc {
enum : int64_t { kDot, kGradSq, kOldSq, kNewSq, kNumSums };
}

// The extrapolate_ / extrap_step_ hyper-parameter table (EXTRAP_*).
namespace extrap {
enum : int64_t { kLr, kGamma, kMomentum, kWeightDecay, kNesterov, kActive, kNumHyper };
}

// The lamb_step_ hyper-parameter table (LAMB_LR ... LAMB_ACTIVE).
namespace lamb {
enum : int64_t {
  kLr,
  kBeta1,
  kBeta2,
  kEps,
  kWeightDecay,
  kRatioMin,
  kRatioMax,
  kAdapt,
  kBiasCorrection,
  kMaxGradNorm,
  kActive,
  kNumHyper
};
}

// lamb_step_'s per-segment statistics (LAMB_W_SQ ... LAMB_RATIO).
namespace lamb_stats {
enum : int64_t { kWSq, kUSq, kGSq, kRatio, kNumStats };
}

struct Column {
  const char* name;  // the name in dynbatch_kernels/columns.py
  int64_t value;
};

inline constexpr Column kExported[] = {
    {"ACC_DOT", acc::kDot},
    {"GRAD_SQ", acc::kGradSq},
    {"ACC_OLD_SQ", acc::kOldSq},
    {"ACC_NEW_SQ", acc::kNewSq},
    {"NUM_ACC_SUMS", acc::kNumSums},
    {"EXTRAP_LR", extrap::kLr},
    {"EXTRAP_GAMMA", extrap::kGamma},
    {"EXTRAP_MOMENTUM", extrap::kMomentum},
    {"EXTRAP_WEIGHT_DECAY", extrap::kWeightDecay},
    {"EXTRAP_NESTEROV", extrap::kNesterov},
    {"EXTRAP_ACTIVE", extrap::kActive},
    {"NUM_EXTRAP_HYPER", extrap::kNumHyper},
    {"LAMB_LR", lamb::kLr},
    {"LAMB_BETA1", lamb::kBeta1},
    {"LAMB_BETA2", lamb::kBeta2},
    {"LAMB_EPS", lamb::kEps},
    {"LAMB_WEIGHT_DECAY", lamb::kWeightDecay},
    {"LAMB_RATIO_MIN", lamb::kRatioMin},
    {"LAMB_RATIO_MAX", lamb::kRatioMax},
    {"LAMB_ADAPT", lamb::kAdapt},
    {"LAMB_BIAS_CORRECTION", lamb::kBiasCorrection},
    {"LAMB_MAX_GRAD_NORM", lamb::kMaxGradNorm},
    {"LAMB_ACTIVE", lamb::kActive},
    {"NUM_LAMB_HYPER", lamb::kNumHyper},
    {"LAMB_W_SQ", lamb_stats::kWSq},
    {"LAMB_U_SQ", lamb_stats::kUSq},
    {"LAMB_G_SQ", lamb_stats::kGSq},
    {"LAMB_RATIO", lamb_stats::kRatio},
    {"NUM_LAMB_STATS", lamb_stats::kNumStats},
};

}  // namespace dynbatch::columns
