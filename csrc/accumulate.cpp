// accumulate_: acc += scale * grad in one pass, with per-segment sums
//   [acc_old . s*g, |s*g|^2, |acc_old|^2, |acc_new|^2], and grad optionally zeroed in the same pass.
#include "chunks.h"
#include "columns.h"

namespace dynbatch {
namespace {

using namespace columns::acc;  // kDot, kGradSq, kOldSq, kNewSq, kNumSums

// One chunk [start, end): the update and its four partial sums.
template <typename grad_t, bool kZeroGrad>
DYNBATCH_VECTORIZED void accumulate_chunk(float* __restrict acc, grad_t* __restrict grad, int64_t start,
                                          int64_t end, float scale, float* __restrict out) {
  float dot = 0.f, gg = 0.f, aa = 0.f, nn = 0.f;
#pragma omp simd reduction(+ : dot, gg, aa, nn)
  for (int64_t i = start; i < end; ++i) {
    const float a = acc[i];
    const float g = static_cast<float>(grad[i]) * scale;
    const float n = a + g;
    acc[i] = n;
    if constexpr (kZeroGrad) grad[i] = grad_t(0);
    dot += a * g;
    gg += g * g;
    aa += a * a;
    nn += n * n;
  }
  out[kDot] = dot;
  out[kGradSq] = gg;
  out[kOldSq] = aa;
  out[kNewSq] = nn;
}

template <typename grad_t, bool kZeroGrad>
void accumulate_chunks(float* acc, grad_t* grad, const int64_t* starts, const int64_t* ends,
                       float* partials, int64_t num_chunks, float scale) {
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      accumulate_chunk<grad_t, kZeroGrad>(acc, grad, starts[c], ends[c], scale, partials + c * kNumSums);
    }
  });
}

at::Tensor accumulate_cpu(at::Tensor acc, at::Tensor grad, const at::Tensor& chunk_starts,
                          const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                          double scale, bool zero_grad) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "acc must be contiguous float32");
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == acc.numel(), "grad must be contiguous, as long as acc");
  check_chunk_table(chunk_starts, chunk_ends, segment_chunks);
  const int64_t num_chunks = chunk_starts.numel();
  auto partials = at::empty({num_chunks, kNumSums}, acc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "accumulate_", [&] {
    auto* run = zero_grad ? accumulate_chunks<scalar_t, true> : accumulate_chunks<scalar_t, false>;
    run(acc.data_ptr<float>(), grad.data_ptr<scalar_t>(), chunk_starts.data_ptr<int64_t>(),
        chunk_ends.data_ptr<int64_t>(), partials.data_ptr<float>(), num_chunks,
        static_cast<float>(scale));
  });
  return reduce_chunks(partials, segment_chunks);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynbatch_cpp, CPU, m) { m.impl("accumulate_", accumulate_cpu); }

}  // namespace dynbatch
