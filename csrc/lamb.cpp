// LAMB / LAMBC over the segments' tensors (the math and byte counts: dynbatch_kernels/ops/lamb.py).
//   lamb_step_:       pass 1 (m, v, u into update; partial |w|^2 |u|^2 |g|^2 per chunk) -> per-segment
//                     trust ratios -> pass 2 (w -= lr * r * u, u read back from update), wave by wave:
//                     segments that fit in the cache together run both passes before the next ones, their
//                     u in a scratch buffer unless update is grad itself; a larger segment's u goes over
//                     its gradient when update is grad, else the end of each thread's part of it stays in
//                     the scratch and the rest is streamed to update. Nothing is written when the step is
//                     skipped.
//   lamb_update_ / lamb_apply_: pass 1 (returning the statistics) and pass 2 (ratios from statistics that
//                     may have been summed over the shards of each tensor in between) as two calls.
//   segment_sq_norms: per-segment |s*x|^2 in one read (pass 0: the global gradient norm for clipping).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>

#include "chunks.h"
#include "columns.h"
#include "direct.h"
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

// w at index i: the master copy's when there is one, else the parameter's.
template <typename scalar_t, bool kMaster>
inline float weight(const scalar_t* param, const float* master, int64_t i) {
  if constexpr (kMaster) {
    return master[i];
  } else {
    return static_cast<float>(param[i]);
  }
}

// w <- next at index i, into the master copy (if any) and the parameters.
template <typename scalar_t, bool kMaster>
inline void set_weight(scalar_t* param, float* master, int64_t i, float next) {
  if constexpr (kMaster) master[i] = next;
  param[i] = to_storage<scalar_t>(next);
}

float value_or(const std::optional<at::Tensor>& scalar, float fallback) {
  return scalar ? scalar->item<float>() : fallback;
}

// u = m_hat / (sqrt(v_hat) + eps) + wd * w from the updated moments.
struct Direction {
  float inv_bc1, inv_sqrt_bc2, eps, weight_decay;
  float operator()(float m, float v, float w) const {
    return m * inv_bc1 / (std::sqrt(v) * inv_sqrt_bc2 + eps) + weight_decay * w;
  }
};

// The per-chunk constants of pass 1: a segment's hyper-parameters at step t, and the gradient scale.
struct Coefficients {
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  Direction direction;
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
          {static_cast<float>(1.0 / bc1), static_cast<float>(1.0 / std::sqrt(bc2)), h[kEps], h[kWeightDecay]},
          inv_scale / clip};
}

// Where pass 1 puts u: a separate buffer, the gradient itself (read then written at each index through
// one pointer), or a separate buffer through streaming stores (stream.h), a block at a time from a staging
// area in the first-level cache.
enum class UStore { kSeparate, kInPlace, kStreamed };

// Elements per block of pass 1: each block's u is streamed out as soon as it is computed, which keeps the
// streaming stores interleaved with the loads (one burst per chunk stalls them). Every UStore runs the same
// blocks and sums, so all give the same bits.
constexpr int64_t kBlock = 256;

// The first bytes of the next segment's separately allocated param and grad, prefetched while the current
// chunk runs: each such tensor starts a new memory stream, which the hardware prefetcher follows only after
// its first misses (2,000 separate tensors of 1-4096 elements: 7-12% of lamb_step_'s time, ad hoc A/B).
// Spread over the chunk's blocks, as many lines per block as the block itself loads from each operand.
struct Prefetch {
  const char* param = nullptr;  // null: the operand is one flat buffer (its stream just goes on)
  const char* grad = nullptr;
  int64_t bytes = 0;

  // Prefetches the lines of [from, to) (byte offsets into the next segment) below `bytes`.
  void lines(int64_t from, int64_t to) const {
    prefetch_bytes(param, from, std::min(to, bytes));
    prefetch_bytes(grad, from, std::min(to, bytes));
  }
};

// How much of the next segment's tensors Prefetch reads ahead: enough for the hardware to pick up the stream.
constexpr int64_t kPrefetchBytes = 4096;

// Pass 1 over one chunk of n elements: m, v and u (into update) unless !kWrite; returns |w|^2, |u|^2,
// |s*g|^2. `next`: what to prefetch of the next segment meanwhile.
template <typename scalar_t, bool kMaster, bool kWrite, UStore kStore>
DYNBATCH_VECTORIZED void update_chunk(const scalar_t* __restrict param, const float* __restrict master,
                                      const scalar_t* __restrict grad, scalar_t* __restrict update,
                                      float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t n,
                                      const Coefficients k, float inv_scale, float* __restrict out,
                                      const Prefetch next) {
  // Locals, not loads through k: the buffers' float stores could alias k's fields and stop the vectorizer.
  const float beta1 = k.beta1, beta2 = k.beta2, one_minus_beta1 = k.one_minus_beta1;
  const float one_minus_beta2 = k.one_minus_beta2;
  const float grad_scale = k.grad_scale;
  const Direction direction = k.direction;
  alignas(64) scalar_t staged[kStore == UStore::kStreamed ? kBlock : 1];
  float ww = 0.f, uu = 0.f, gg = 0.f;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t len = std::min(kBlock, n - lo);
    constexpr int64_t kSize = sizeof(scalar_t);
    next.lines(lo * kSize, (lo + kBlock) * kSize);
    scalar_t* u_out = kStore == UStore::kStreamed ? staged : update + lo;
    const scalar_t* g_in = kStore == UStore::kInPlace ? update + lo : grad + lo;
    float block_ww = 0.f, block_uu = 0.f, block_gg = 0.f;
#pragma omp simd reduction(+ : block_ww, block_uu, block_gg)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t at = lo + i;
      const float w = weight<scalar_t, kMaster>(param, master, at);
      const float raw = static_cast<float>(g_in[i]);
      const float g = raw * grad_scale;
      const float m = beta1 * exp_avg[at] + one_minus_beta1 * g;
      const float v = beta2 * exp_avg_sq[at] + one_minus_beta2 * g * g;
      const float u = direction(m, v, w);
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

// Pass 2 over one chunk of n elements: w -= scale * u.
template <typename scalar_t, bool kMaster>
DYNBATCH_VECTORIZED void apply_chunk(scalar_t* __restrict param, float* __restrict master,
                                     const scalar_t* __restrict update, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float w = weight<scalar_t, kMaster>(param, master, i);
    set_weight<scalar_t, kMaster>(param, master, i, w - scale * static_cast<float>(update[i]));
  }
}

// The operands of lamb_step_ (master: empty when there is none).
struct Buffers {
  Operand param, grad, update, exp_avg, exp_avg_sq, master;
};

// Chunks [begin, end) of the table.
struct ChunkRange {
  int64_t begin, end;
};

// A share of a chunk range: the `slot`-th of its num_parts contiguous parts (for_each_part).
struct Part {
  int64_t slot;
  ChunkRange chunks;
};

// How many parts for_each_part cuts `range` into: one per thread, fewer if it has fewer chunks.
int64_t num_parts(ChunkRange range) {
  return std::min<int64_t>(at::get_num_threads(), range.end - range.begin);
}

// fn(part) for each part of `range` (ceil(chunks / num_parts) chunks each; the last ones may be shorter
// or empty), the parts in parallel: both passes cut a range alike, so each knows its part's slot.
template <typename F>
void for_each_part(ChunkRange range, const F& fn) {
  const int64_t count = num_parts(range);
  if (count <= 0) return;
  const int64_t per = (range.end - range.begin + count - 1) / count;
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t slot = first; slot < last; ++slot) {
      const int64_t begin = std::min(range.end, range.begin + slot * per);
      fn(Part{slot, {begin, std::min(range.end, begin + per)}});
    }
  });
}

// Where pass 1 puts u and pass 2 reads it back: the update operand, except for the chunks held in a
// wave's scratch buffer: all of a wave that fits in the cache (the scratch holds its virtual indices
// [origin, origin + its length)), or the last `tail_chunks` chunks of each part of a larger segment, the
// ones pass 2 (walking back) reaches first (part `slot`'s from scratch chunk slot * tail_chunks on, chunks
// `chunk_len` elements apart).
struct UTarget {
  const Operand* update;
  void* scratch = nullptr;
  int64_t origin = 0;
  int64_t tail_chunks = 0;  // 0: the whole wave is in the scratch
  int64_t chunk_len = 0;

  bool in_scratch(int64_t c, const Part& part) const {
    return scratch && (tail_chunks == 0 || c >= part.chunks.end - tail_chunks);
  }

  // u of chunk c (segment `segment`, first virtual index `start`) of `part`.
  template <typename T>
  T* chunk(int64_t c, int64_t segment, int64_t start, const Part& part) const {
    if (!in_scratch(c, part)) return update->chunk<T>(segment, start);
    T* base = static_cast<T*>(scratch);
    if (tail_chunks == 0) return base + (start - origin);
    return base + (part.slot * tail_chunks + c - (part.chunks.end - tail_chunks)) * chunk_len;
  }
};

// Pass 1 over the range. `stream`: the update buffer is too large to stay cached until pass 2 reads it, so
// a chunk whose u goes there (not over its gradient: that is decided here, per chunk) is written with
// streaming stores, which spares the write-allocate read of each of its lines.
template <typename scalar_t, bool kMaster, bool kWrite>
void update_pass(const Buffers& b, const UTarget& u, const float* hyper, const float* steps, const Chunks& t,
                 ChunkRange range, float inv_scale, float grad_norm, bool stream, float* partials) {
  for_each_part(range, [&](const Part& part) {
    const int64_t end = part.chunks.end;
    for (int64_t c = part.chunks.begin; c < end; ++c) {
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
      scalar_t* update = u.chunk<scalar_t>(c, seg, lo, part);
      float* exp_avg = b.exp_avg.chunk<float>(seg, lo);
      float* exp_avg_sq = b.exp_avg_sq.chunk<float>(seg, lo);
      const bool in_place = static_cast<const void*>(grad) == static_cast<const void*>(update);
      auto* run = update_chunk<scalar_t, kMaster, kWrite, UStore::kSeparate>;
      if (kWrite && in_place) {
        run = update_chunk<scalar_t, kMaster, kWrite, UStore::kInPlace>;
      } else if (kWrite && stream && !u.in_scratch(c, part)) {
        run = update_chunk<scalar_t, kMaster, kWrite, UStore::kStreamed>;
      }
      Prefetch next;
      if (c + 1 < end && t.chunk_segments[c + 1] != seg) {
        const int64_t next_seg = t.chunk_segments[c + 1], next_lo = t.starts[c + 1];
        next.bytes = std::min(kPrefetchBytes, (t.ends[c + 1] - next_lo) * static_cast<int64_t>(sizeof(scalar_t)));
        if (!b.param.flat) next.param = reinterpret_cast<const char*>(b.param.chunk<scalar_t>(next_seg, next_lo));
        if (!b.grad.flat) next.grad = reinterpret_cast<const char*>(b.grad.chunk<scalar_t>(next_seg, next_lo));
      }
      // In place, grad is passed as null: the kernel reads it through update, the one pointer it writes.
      run(param, master, kWrite && in_place ? nullptr : grad, update, exp_avg, exp_avg_sq, n, k, inv_scale,
          out, next);
    }
    if (stream) stream_fence();
  });
}

// Pass 2 over the range, each part's chunks in reverse: the last ones pass 1 touched are the likeliest
// still cached.
template <typename scalar_t, bool kMaster>
void apply_pass(const Buffers& b, const UTarget& u, const float* hyper, const float* stats, const Chunks& t,
                ChunkRange range) {
  for_each_part(range, [&](const Part& part) {
    for (int64_t c = part.chunks.end - 1; c >= part.chunks.begin; --c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c], n = t.ends[c] - lo;
      const float* h = hyper + seg * kNumHyper;
      if (h[kActive] == 0.f) continue;
      scalar_t* param = b.param.chunk<scalar_t>(seg, lo);
      float* master = kMaster ? b.master.chunk<float>(seg, lo) : nullptr;
      const float scale = h[kLr] * stats[seg * kNumStats + kRatio];
      apply_chunk<scalar_t, kMaster>(param, master, u.chunk<scalar_t>(c, seg, lo, part), n, scale);
    }
  });
}

// r_j = clip(|w|_j / |u|_j, r_min, r_max) where adapted and both norms are nonzero, else 1; segments
// [first, last).
void trust_ratios(float* stats, const float* hyper, int64_t first, int64_t last) {
  for (int64_t j = first; j < last; ++j) {
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
    using pass1_t = void (*)(const Buffers&, const UTarget&, const float*, const float*, const Chunks&,
                             ChunkRange, float, float, bool, float*);
    const bool stream = table.layout.num_elements * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytes;
    const pass1_t passes[2][2] = {{update_pass<scalar_t, false, false>, update_pass<scalar_t, false, true>},
                                  {update_pass<scalar_t, true, false>, update_pass<scalar_t, true, true>}};
    passes[has_master][!k.skip](b, UTarget{&b.update}, h, steps, table, {0, table.num_chunks}, k.inv_scale,
                                std::sqrt(k.norm_sq), stream, partials.data());
  });
  return reduce_chunks(partials, kNumStats, table);
}

// step += 1 where the segment is active.
void advance_steps(float* steps, const float* h, int64_t num_segments) {
  for (int64_t j = 0; j < num_segments; ++j) steps[j] += h[j * kNumHyper + kActive] != 0.f ? 1.f : 0.f;
}

// Trust ratios from stats' norms into its ratio column, then (unless skipped) pass 2 and step += 1.
void run_apply(const Buffers& b, bool has_master, const float* h, float* steps, const Chunks& table,
               const StepScalars& k, const at::Tensor& stats, const std::optional<at::Tensor>& found_inf) {
  const int64_t num_segments = table.layout.num_segments;
  trust_ratios(stats.data_ptr<float>(), h, 0, num_segments);
  if (k.skip) {
    if (k.norm_bad && found_inf) found_inf->fill_(1.f);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(b.param, at::kFloat), "lamb_apply_", [&] {
    auto* run = has_master ? apply_pass<scalar_t, true> : apply_pass<scalar_t, false>;
    run(b, UTarget{&b.update}, h, stats.const_data_ptr<float>(), table, {0, table.num_chunks});
  });
  advance_steps(steps, h, num_segments);
}

// Virtual elements (padding included) of one wave of lamb_step_: the wave's w and u, 8 bytes per float32
// element, must survive the other streams of pass 1 in the last-level cache until pass 2 reads them.
constexpr int64_t kWaveElements = int64_t{1} << 20;

// This thread's scratch for the waves' u: at least `bytes`, 64-byte aligned, kept from call to call.
void* wave_scratch(int64_t bytes) {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<void, Free> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < bytes) {
    const int64_t rounded = (bytes + 63) / 64 * 64;
    void* fresh = std::aligned_alloc(64, rounded);
    TORCH_CHECK(fresh, "lamb_step_: cannot allocate ", rounded, " bytes of scratch");
    buffer.reset(fresh);
    capacity = rounded;
  }
  return buffer.get();
}

// Whether some segment of [first, last) has its u written over its gradient (update is grad there).
template <typename scalar_t>
bool writes_over_grad(const Buffers& b, const Layout& layout, int64_t first, int64_t last) {
  for (int64_t j = first; j < last; ++j) {
    const int64_t lo = layout.offsets[j];
    if (layout.lengths[j] > 0 && b.grad.chunk<scalar_t>(j, lo) == b.update.chunk<scalar_t>(j, lo)) return true;
  }
  return false;
}

// The largest chunk of the table, in elements.
int64_t largest_chunk(const Chunks& t) {
  int64_t largest = 0;
  for (int64_t c = 0; c < t.num_chunks; ++c) largest = std::max(largest, t.ends[c] - t.starts[c]);
  return largest;
}

// Whether lamb_step_ runs in waves: only when its chunks are small enough for every thread to have a few
// of each wave's (a table of coarser chunks runs both passes over all of them instead).
bool in_waves(const Chunks& t) {
  return largest_chunk(t) * 2 * at::get_num_threads() <= kWaveElements;
}

// lamb_step_ when not skipped, in waves: consecutive segments of at most kWaveElements together go through
// pass 1, their trust ratios and pass 2 before the next wave starts, so pass 2 finds w and u still cached.
// Where update is grad for a segment of the wave, u goes over the gradient as in the two passes. Else a
// wave's u stays in a scratch buffer, never written to memory. A segment larger than a wave is a wave of
// its own: pass 1 keeps the u of the last chunks of each thread's part in the scratch (pass 2, walking
// back, reads them first, while they are cached) and streams the rest to `update`. On BERT-base's
// separate tensors this takes 1.02x the time of u written over the gradients, against 1.08x for u
// recomputed by pass 2 from m, v and w (the same 40 bytes per element, but a second square root and
// division per element), ad hoc A/B on a Xeon.
// The chunks' partial sums and their per-segment reduction are the two-pass ones: the same bits.
template <typename scalar_t, bool kMaster>
void step_in_waves(const Buffers& b, const float* h, const float* steps, const Chunks& t, const StepScalars& k,
                   float* stats) {
  const int64_t* off = t.layout.offsets;
  const int64_t num_segments = t.layout.num_segments;
  void* scratch = wave_scratch(kWaveElements * static_cast<int64_t>(sizeof(scalar_t)));
  std::vector<float> partials(t.num_chunks * kNumStats);
  for (int64_t first = 0; first < num_segments;) {
    int64_t last = first + 1;
    while (last < num_segments && off[last + 1] - off[first] <= kWaveElements) ++last;
    const bool cached = off[last] - off[first] <= kWaveElements;
    const ChunkRange range{t.segment_chunks[first], t.segment_chunks[last]};
    UTarget u{&b.update, nullptr, off[first]};
    if (!writes_over_grad<scalar_t>(b, t.layout, first, last)) {
      u.scratch = scratch;
      if (!cached && range.end > range.begin) {  // a wave of one segment: its parts' tails in the scratch
        u.chunk_len = largest_chunk(t);
        u.tail_chunks = kWaveElements / (num_parts(range) * u.chunk_len);
        TORCH_INTERNAL_ASSERT(u.tail_chunks > 0, "lamb_step_: chunks too large for waves");  // in_waves: >= 2
      }
    }
    update_pass<scalar_t, kMaster, true>(b, u, h, steps, t, range, k.inv_scale, std::sqrt(k.norm_sq),
                                         /*stream=*/!cached, partials.data());
    sum_segments(partials.data(), kNumStats, t, first, last, stats);
    trust_ratios(stats, h, first, last);
    apply_pass<scalar_t, kMaster>(b, u, h, stats, t, range);
    first = last;
  }
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
                    const at::Tensor& step, const at::Tensor& hyper, const at::Tensor& stats,
                    const at::Tensor& host_offsets,
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
                         std::optional<at::TensorList> master, const at::Tensor& step, const at::Tensor& hyper,
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
  // Skipped (pass 1 for the statistics only, nothing written), or chunks too coarse for waves: two passes.
  if (k.skip || !in_waves(table)) {
    at::Tensor stats = run_update(b, master.has_value(), h, step.const_data_ptr<float>(), table, k);
    run_apply(b, master.has_value(), h, step.data_ptr<float>(), table, k, stats, found_inf);
    return stats;
  }
  at::Tensor stats = at::empty({table.layout.num_segments, kNumStats}, at::TensorOptions().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(b.param, at::kFloat), "lamb_step_", [&] {
    auto* run = master ? step_in_waves<scalar_t, true> : step_in_waves<scalar_t, false>;
    run(b, h, step.const_data_ptr<float>(), table, k, stats.data_ptr<float>());
  });
  advance_steps(step.data_ptr<float>(), h, table.layout.num_segments);
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
DYNBATCH_DIRECT(lamb_step_, lamb_step_cpu);
DYNBATCH_DIRECT(lamb_update_, lamb_update_cpu);
DYNBATCH_DIRECT(lamb_apply_, lamb_apply_cpu);
DYNBATCH_DIRECT(segment_sq_norms, segment_sq_norms_cpu);

}  // namespace dynbatch
