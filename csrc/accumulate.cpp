// accumulate_: acc += scale * grad in one pass (or out = acc + scale * grad, acc only read), with
// per-segment sums [acc_old . s*g, |s*g|^2, |acc_old|^2, |acc_new|^2], and grad optionally zeroed in the
// same pass.
#include <algorithm>

#include "chunks.h"
#include "columns.h"
#include "direct.h"

namespace dynbatch {
namespace {

using namespace columns::acc;  // kDot, kGradSq, kOldSq, kNewSq, kNumSums

// Elements per block of a chunk: the loads kAheadBytes ahead are issued block by block.
constexpr int64_t kBlock = 256;

// How far the memory of each operand goes on from a chunk's first element (Operand::room): where
// prefetch_ahead stops.
struct Rooms {
  int64_t acc, grad, sum;
};

// One chunk of n elements: the update and its four partial sums. kOut: the sum goes to dst and src is
// only read; else dst is read and written (src unused).
template <typename grad_t, bool kZeroGrad, bool kOut>
DYNBATCH_VECTORIZED void accumulate_chunk(float* __restrict dst, const float* __restrict src,
                                          grad_t* __restrict grad, int64_t n, float scale, const Rooms room,
                                          float* __restrict out) {
  float dot = 0.f, gg = 0.f, aa = 0.f, nn = 0.f;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = std::min(lo + kBlock, n);
    prefetch_ahead(kOut ? src : dst, lo, hi, room.acc);
    prefetch_ahead(grad, lo, hi, room.grad);
    if constexpr (kOut) prefetch_ahead(dst, lo, hi, room.sum);
    float block_dot = 0.f, block_gg = 0.f, block_aa = 0.f, block_nn = 0.f;
#pragma omp simd reduction(+ : block_dot, block_gg, block_aa, block_nn)
    for (int64_t i = lo; i < hi; ++i) {
      const float a = kOut ? src[i] : dst[i];
      const float g = static_cast<float>(grad[i]) * scale;
      const float n_ = a + g;
      dst[i] = n_;
      if constexpr (kZeroGrad) grad[i] = grad_t(0);
      block_dot += a * g;
      block_gg += g * g;
      block_aa += a * a;
      block_nn += n_ * n_;
    }
    dot += block_dot;
    gg += block_gg;
    aa += block_aa;
    nn += block_nn;
  }
  out[kDot] = dot;
  out[kGradSq] = gg;
  out[kOldSq] = aa;
  out[kNewSq] = nn;
}

template <typename grad_t, bool kZeroGrad, bool kOut>
void accumulate_chunks(const Operand& acc, const Operand& grad, const Operand& sum, const Chunks& t,
                       float* partials, float scale) {
  at::parallel_for(0, t.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c];
      float* dst = kOut ? sum.chunk<float>(seg, lo) : acc.chunk<float>(seg, lo);
      const float* src = kOut ? acc.chunk<float>(seg, lo) : nullptr;
      const Rooms room{acc.room(seg, lo), grad.room(seg, lo), kOut ? sum.room(seg, lo) : 0};
      accumulate_chunk<grad_t, kZeroGrad, kOut>(dst, src, grad.chunk<grad_t>(seg, lo), t.ends[c] - lo, scale,
                                                room, partials + c * kNumSums);
    }
  });
}

at::Tensor accumulate_cpu(at::TensorList acc_list, at::TensorList grad_list,
                          std::optional<at::TensorList> out_list, const at::Tensor& host_offsets,
                          const at::Tensor& host_lengths, const at::Tensor& chunk_starts,
                          const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                          const at::Tensor& chunk_segments, double scale, bool zero_grad) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Operand acc = cpu_operand("acc", acc_list, table, at::kFloat);
  const Operand grad = cpu_operand("grad", grad_list, table);
  const Operand sum = out_list ? cpu_operand("out", *out_list, table, at::kFloat) : Operand{};
  const bool separate = out_list && sum.data != acc.data;
  std::vector<float> partials(table.num_chunks * kNumSums);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_or(grad, at::kFloat), "accumulate_", [&] {
    using run_t = void (*)(const Operand&, const Operand&, const Operand&, const Chunks&, float*, float);
    const run_t runs[2][2] = {{accumulate_chunks<scalar_t, false, false>, accumulate_chunks<scalar_t, false, true>},
                              {accumulate_chunks<scalar_t, true, false>, accumulate_chunks<scalar_t, true, true>}};
    runs[zero_grad][separate](acc, grad, sum, table, partials.data(), static_cast<float>(scale));
  });
  return reduce_chunks(partials, kNumSums, table);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynbatch_cpp, CPU, m) { m.impl("accumulate_", accumulate_cpu); }
DYNBATCH_DIRECT(accumulate_, accumulate_cpu);

}  // namespace dynbatch
