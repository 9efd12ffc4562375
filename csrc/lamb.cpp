// LAMB / LAMBC over the segments' tensors (the math and byte counts: dynbatch_kernels/ops/lamb.py).
//   lamb_step_:       pass 1 (m, v, u into update; partial |w|^2 |u|^2 |g|^2 per chunk) -> per-segment
//                     trust ratios -> pass 2 (w -= lr * r * u, u read back from update). Nothing is
//                     written when the step is skipped. update may be grad itself; a separate update
//                     buffer too large to stay cached until pass 2 is written with streaming stores.
//   lamb_update_ / lamb_apply_: pass 1 (returning the statistics) and pass 2 (ratios from statistics that
//                     may have been summed over the shards of each tensor in between) as two calls.
//   segment_sq_norms: per-segment |s*x|^2 in one read (pass 0: the global gradient norm for clipping).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "chunks.h"
#include "columns.h"
#include "stream.h"

namespace dynbatch {
namespace {

using namespace columns::lamb;        // hyper-parameter columns: kLr ... kActive, kNumHyper
using namespace columns::lamb_stats;  // statistics columns: kWSq ... kRatio, kNumStats

// float -> storage dtype, rounding to nearest even. c10's bfloat16 conversion branches on NaN, which keeps
// a loop scalar; this select gives the same bits and vectorizes.
template <typename scalar_t>
inline scalar_t to_storage(float x) {
  return static_cast<scalar_t>(x);
}

template <>
inline c10::BFloat16 to_storage<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(x != x ? uint16_t{0x7FC0} : rounded, c10::BFloat16::from_bits());
}

float value_or(const std::optional<at::Tensor>& scalar, float fallback) {
  return scalar ? scalar->item<float>() : fallback;
}

// The per-chunk constants of pass 1: a segment's hyper-parameters at step t, and the gradient scale.
struct Coefficients {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, inv_bc1, inv_sqrt_bc2, eps, weight_decay;
  float grad_scale;  // s / c: the inverse loss scale over the clipping factor
};

Coefficients coefficients(const float* h, float steps_done, float inv_scale, float grad_norm) {
  const double t = static_cast<double>(steps_done) + 1.0;
  const bool correct = h[kBiasCorrection] != 0.f;
  const double bc1 = correct ? 1.0 - std::pow(static_cast<double>(h[kBeta1]), t) : 1.0;
  const double bc2 = correct ? 1.0 - std::pow(static_cast<double>(h[kBeta2]), t) : 1.0;
  const float clip = std::max(1.f, grad_norm / h[kMaxGradNorm]);
  return {h[kBeta1],
          h[kBeta2],
          1.f - h[kBeta1],
          1.f - h[kBeta2],
          static_cast<float>(1.0 / bc1),
          static_cast<float>(1.0 / std::sqrt(bc2)),
          h[kEps],
          h[kWeightDecay],
          inv_scale / clip};
}

// Where pass 1 puts u: a separate buffer, the gradient itself (read then written at each index through
// one pointer), or a separate buffer through streaming stores (stream.h), a block at a time from a staging
// area in the first-level cache.
enum class UStore { kSeparate, kInPlace, kStreamed };

// Elements per block of pass 1: each block's u is streamed out as soon as it is computed, which keeps the
// streaming stores interleaved with the loads (one burst per chunk stalls them). Every UStore runs the same
// blocks and sums, so all three give the same bits.
constexpr int64_t kBlock = 256;

// Pass 1 over one chunk of n elements: m, v and u (into update) unless !kWrite; returns |w|^2, |u|^2,
// |s*g|^2.
template <typename scalar_t, bool kMaster, bool kWrite, UStore kStore>
DYNBATCH_VECTORIZED void update_chunk(const scalar_t* __restrict param, const float* __restrict master,
                                      const scalar_t* __restrict grad, scalar_t* __restrict update,
                                      float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t n,
                                      const Coefficients k, float inv_scale, float* __restrict out) {
  // Locals, not loads through k: the buffers' float stores could alias k's fields and stop the vectorizer.
  const float beta1 = k.beta1, beta2 = k.beta2, one_minus_beta1 = k.one_minus_beta1;
  const float one_minus_beta2 = k.one_minus_beta2, inv_bc1 = k.inv_bc1, inv_sqrt_bc2 = k.inv_sqrt_bc2;
  const float eps = k.eps, weight_decay = k.weight_decay, grad_scale = k.grad_scale;
  alignas(64) scalar_t staged[kStore == UStore::kStreamed ? kBlock : 1];
  float ww = 0.f, uu = 0.f, gg = 0.f;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t len = std::min(kBlock, n - lo);
    scalar_t* u_out = kStore == UStore::kStreamed ? staged : update + lo;
    const scalar_t* g_in = kStore == UStore::kInPlace ? update + lo : grad + lo;
    float block_ww = 0.f, block_uu = 0.f, block_gg = 0.f;
#pragma omp simd reduction(+ : block_ww, block_uu, block_gg)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t at = lo + i;
      float w;
      if constexpr (kMaster) {
        w = master[at];
      } else {
        w = static_cast<float>(param[at]);
      }
      const float raw = static_cast<float>(g_in[i]);
      const float g = raw * grad_scale;
      const float m = beta1 * exp_avg[at] + one_minus_beta1 * g;
      const float v = beta2 * exp_avg_sq[at] + one_minus_beta2 * g * g;
      const float u = m * inv_bc1 / (std::sqrt(v) * inv_sqrt_bc2 + eps) + weight_decay * w;
      if constexpr (kWrite) {
        exp_avg[at] = m;
        exp_avg_sq[at] = v;
        u_out[i] = to_storage<scalar_t>(u);
      }
      const float unscaled = raw * inv_scale;
      block_ww += w * w;
      block_uu += u * u;
      block_gg += unscaled * unscaled;
    }
    if constexpr (kWrite && kStore == UStore::kStreamed) {
      stream_copy(update + lo, staged, len * static_cast<int64_t>(sizeof(scalar_t)));
    }
    ww += block_ww;
    uu += block_uu;
    gg += block_gg;
  }
  out[kWSq] = ww;
  out[kUSq] = uu;
  out[kGSq] = gg;
  out[kRatio] = 0.f;
}

// Pass 2 over one chunk of n elements: w -= scale * u, into the master copy (if any) and the parameters.
template <typename scalar_t, bool kMaster>
DYNBATCH_VECTORIZED void apply_chunk(scalar_t* __restrict param, float* __restrict master,
                                     const scalar_t* __restrict update, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float w;
    if constexpr (kMaster) {
      w = master[i];
    } else {
      w = static_cast<float>(param[i]);
    }
    const float next = w - scale * static_cast<float>(update[i]);
    if constexpr (kMaster) master[i] = next;
    param[i] = to_storage<scalar_t>(next);
  }
}

// The operands of lamb_step_ (master: empty when there is none).
struct Buffers {
  Operand param, grad, update, exp_avg, exp_avg_sq, master;
};

// Pass 1 over every chunk. `stream`: u goes to a separate update buffer of at least kStreamMinBytes, too
// large to stay cached until pass 2 reads it, so it is written with streaming stores, which spares the
// write-allocate read of each of its lines.
template <typename scalar_t, bool kMaster, bool kWrite>
void update_pass(const Buffers& b, const float* hyper, const float* steps, const Chunks& t, float inv_scale,
                 float grad_norm, bool stream, float* partials) {
  at::parallel_for(0, t.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c], n = t.ends[c] - lo;
      const float* h = hyper + seg * kNumHyper;
      float* out = partials + c * kNumStats;
      if (h[kActive] == 0.f) {
        std::fill(out, out + kNumStats, 0.f);
        continue;
      }
      const Coefficients k = coefficients(h, steps[seg], inv_scale, grad_norm);
      const scalar_t* param = b.param.chunk<scalar_t>(seg, lo);
      const float* master = kMaster ? b.master.chunk<float>(seg, lo) : nullptr;
      const scalar_t* grad = b.grad.chunk<scalar_t>(seg, lo);
      scalar_t* update = b.update.chunk<scalar_t>(seg, lo);
      float* exp_avg = b.exp_avg.chunk<float>(seg, lo);
      float* exp_avg_sq = b.exp_avg_sq.chunk<float>(seg, lo);
      const bool in_place = static_cast<const void*>(grad) == static_cast<const void*>(update);
      auto* run = update_chunk<scalar_t, kMaster, kWrite, UStore::kSeparate>;
      if (kWrite && in_place) {
        run = update_chunk<scalar_t, kMaster, kWrite, UStore::kInPlace>;
      } else if (kWrite && stream) {
        run = update_chunk<scalar_t, kMaster, kWrite, UStore::kStreamed>;
      }
      // In place, grad is passed as null: the kernel reads it through update, the one pointer it writes.
      run(param, master, kWrite && in_place ? nullptr : grad, update, exp_avg, exp_avg_sq, n, k, inv_scale,
          out);
    }
    if (stream) stream_fence();
  });
}

template <typename scalar_t, bool kMaster>
void apply_pass(const Buffers& b, const float* hyper, const float* stats, const Chunks& t) {
  at::parallel_for(0, t.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c];
      const float* h = hyper + seg * kNumHyper;
      if (h[kActive] == 0.f) continue;
      apply_chunk<scalar_t, kMaster>(b.param.chunk<scalar_t>(seg, lo),
                                     kMaster ? b.master.chunk<float>(seg, lo) : nullptr,
                                     b.update.chunk<scalar_t>(seg, lo), t.ends[c] - lo,
                                     h[kLr] * stats[seg * kNumStats + kRatio]);
    }
  });
}

// r_j = clip(|w|_j / |u|_j, r_min, r_max) where adapted and both norms are nonzero, else 1.
void trust_ratios(float* stats, const float* hyper, int64_t num_segments) {
  for (int64_t j = 0; j < num_segments; ++j) {
    const float* h = hyper + j * kNumHyper;
    float* s = stats + j * kNumStats;
    float ratio = 1.f;
    if (h[kAdapt] != 0.f && s[kWSq] > 0.f && s[kUSq] > 0.f) {
      ratio = std::min(std::max(std::sqrt(s[kWSq]) / std::sqrt(s[kUSq]), h[kRatioMin]), h[kRatioMax]);
    }
    s[kRatio] = ratio;
  }
}

void check_buffer(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel, name,
              " must be a contiguous CPU tensor of ", numel, " elements of ", dtype);
}

// The step's scalars: the inverse loss scale, the clipping norm, and whether the step is skipped.
struct StepScalars {
  float inv_scale, norm_sq;
  bool norm_bad, skip;
};

StepScalars step_scalars(const std::optional<at::Tensor>& grad_sq_norm,
                         const std::optional<at::Tensor>& inv_grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const float norm_sq = value_or(grad_sq_norm, 0.f);
  const bool norm_bad = grad_sq_norm && !std::isfinite(norm_sq);
  return {value_or(inv_grad_scale, 1.f), norm_sq, norm_bad, norm_bad || value_or(found_inf, 0.f) != 0.f};
}

// The operands of pass 1 (every one) or pass 2 (param, update, master), checked against the table.
Buffers lamb_buffers(at::TensorList param, at::TensorList grad, at::TensorList update, at::TensorList exp_avg,
                     at::TensorList exp_avg_sq, const std::optional<at::TensorList>& master, const Chunks& table,
                     const at::Tensor& step, const at::Tensor& hyper) {
  Buffers b;
  b.param = cpu_operand("param", param, table);
  b.update = cpu_operand("update", update, table, b.param.dtype);
  if (!grad.empty()) {
    b.grad = cpu_operand("grad", grad, table, b.param.dtype);
    b.exp_avg = cpu_operand("exp_avg", exp_avg, table, at::kFloat);
    b.exp_avg_sq = cpu_operand("exp_avg_sq", exp_avg_sq, table, at::kFloat);
  }
  if (master) b.master = cpu_operand("master", *master, table, at::kFloat);
  check_buffer(step, at::kFloat, table.layout.num_segments, "step");
  check_buffer(hyper, at::kFloat, table.layout.num_segments * kNumHyper, "hyper");
  return b;
}

// Pass 1 and the per-segment reduction: [S, 4] statistics, the ratio column 0.
at::Tensor run_update(const Buffers& b, bool has_master, const float* h, const float* steps, const Chunks& table,
                      const StepScalars& k) {
  std::vector<float> partials(table.num_chunks * kNumStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(b.param, at::kFloat), "lamb_update_", [&] {
    using pass1_t =
        void (*)(const Buffers&, const float*, const float*, const Chunks&, float, float, bool, float*);
    const bool stream = b.update.data != b.grad.data &&
                        table.layout.num_elements * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytes;
    const pass1_t passes[2][2] = {{update_pass<scalar_t, false, false>, update_pass<scalar_t, false, true>},
                                  {update_pass<scalar_t, true, false>, update_pass<scalar_t, true, true>}};
    passes[has_master][!k.skip](b, h, steps, table, k.inv_scale, std::sqrt(k.norm_sq), stream,
                                partials.data());
  });
  return reduce_chunks(partials, kNumStats, table);
}

// Trust ratios from stats' norms into its ratio column, then (unless skipped) pass 2 and step += 1.
void run_apply(const Buffers& b, bool has_master, const float* h, float* steps, const Chunks& table,
               const StepScalars& k, at::Tensor& stats, const std::optional<at::Tensor>& found_inf) {
  const int64_t num_segments = table.layout.num_segments;
  trust_ratios(stats.data_ptr<float>(), h, num_segments);
  if (k.skip) {
    if (k.norm_bad && found_inf) found_inf->fill_(1.f);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(b.param, at::kFloat), "lamb_apply_", [&] {
    auto* run = has_master ? apply_pass<scalar_t, true> : apply_pass<scalar_t, false>;
    run(b, h, stats.const_data_ptr<float>(), table);
  });
  for (int64_t j = 0; j < num_segments; ++j) steps[j] += h[j * kNumHyper + kActive] != 0.f ? 1.f : 0.f;
}

at::Tensor lamb_update_cpu(at::TensorList param, at::TensorList grad, at::TensorList update,
                           at::TensorList exp_avg, at::TensorList exp_avg_sq, std::optional<at::TensorList> master,
                           const at::Tensor& step, const at::Tensor& hyper, const at::Tensor& host_offsets,
                           const at::Tensor& host_lengths, const at::Tensor& chunk_starts,
                           const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                           const at::Tensor& chunk_segments, const std::optional<at::Tensor>& grad_sq_norm,
                           const std::optional<at::Tensor>& inv_grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  TORCH_CHECK(!grad.empty(), "grad: expected a tensor list, got an empty one");
  const Buffers b = lamb_buffers(param, grad, update, exp_avg, exp_avg_sq, master, table, step, hyper);
  return run_update(b, master.has_value(), hyper.const_data_ptr<float>(), step.const_data_ptr<float>(), table,
                    step_scalars(grad_sq_norm, inv_grad_scale, found_inf));
}

void lamb_apply_cpu(at::TensorList param, at::TensorList update, std::optional<at::TensorList> master,
                    at::Tensor step, const at::Tensor& hyper, at::Tensor stats, const at::Tensor& host_offsets,
                    const at::Tensor& host_lengths, const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                    const at::Tensor& segment_chunks, const at::Tensor& chunk_segments,
                    const std::optional<at::Tensor>& grad_sq_norm, const std::optional<at::Tensor>& found_inf) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Buffers b = lamb_buffers(param, {}, update, {}, {}, master, table, step, hyper);
  check_buffer(stats, at::kFloat, table.layout.num_segments * kNumStats, "stats");
  run_apply(b, master.has_value(), hyper.const_data_ptr<float>(), step.data_ptr<float>(), table,
            step_scalars(grad_sq_norm, std::nullopt, found_inf), stats, found_inf);
}

at::Tensor lamb_step_cpu(at::TensorList param, at::TensorList grad, at::TensorList update,
                         at::TensorList exp_avg, at::TensorList exp_avg_sq,
                         std::optional<at::TensorList> master, at::Tensor step, const at::Tensor& hyper,
                         const at::Tensor& host_offsets, const at::Tensor& host_lengths,
                         const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                         const at::Tensor& segment_chunks, const at::Tensor& chunk_segments,
                         const std::optional<at::Tensor>& grad_sq_norm,
                         const std::optional<at::Tensor>& inv_grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Buffers b = lamb_buffers(param, grad, update, exp_avg, exp_avg_sq, master, table, step, hyper);
  const StepScalars k = step_scalars(grad_sq_norm, inv_grad_scale, found_inf);
  const float* h = hyper.const_data_ptr<float>();
  at::Tensor stats = run_update(b, master.has_value(), h, step.const_data_ptr<float>(), table, k);
  run_apply(b, master.has_value(), h, step.data_ptr<float>(), table, k, stats, found_inf);
  return stats;
}

template <typename scalar_t>
DYNBATCH_VECTORIZED float sq_norm_chunk(const scalar_t* __restrict x, int64_t n, float scale) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]) * scale;
    total += v * v;
  }
  return total;
}

template <typename scalar_t>
void sq_norm_chunks(const Operand& x, const Chunks& t, float scale, float* partials) {
  at::parallel_for(0, t.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c];
      partials[c] = sq_norm_chunk(x.chunk<const scalar_t>(seg, lo), t.ends[c] - lo, scale);
    }
  });
}

at::Tensor segment_sq_norms_cpu(at::TensorList x_list, const at::Tensor& host_offsets,
                                const at::Tensor& host_lengths, const at::Tensor& chunk_starts,
                                const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                                const at::Tensor& chunk_segments, const std::optional<at::Tensor>& scale) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Operand x = cpu_operand("x", x_list, table);
  std::vector<float> partials(table.num_chunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(x, at::kFloat), "segment_sq_norms", [&] {
    sq_norm_chunks<scalar_t>(x, table, value_or(scale, 1.f), partials.data());
  });
  return reduce_chunks(partials, 1, table).view({-1});
}

}  // namespace

TORCH_LIBRARY_IMPL(dynbatch_cpp, CPU, m) {
  m.impl("lamb_step_", lamb_step_cpu);
  m.impl("lamb_update_", lamb_update_cpu);
  m.impl("lamb_apply_", lamb_apply_cpu);
  m.impl("segment_sq_norms", segment_sq_norms_cpu);
}

}  // namespace dynbatch
