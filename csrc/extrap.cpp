// extrapolate_ and extrap_step_: the two fused passes of extrapolated SGD (dynbatch_kernels/ops/extrap.py).
//   extrapolate_:  saved <- w;  w <- w - gamma (d + lam w);  d <- 0 (optional)
//   extrap_step_:  from w = saved:  g' = g + lam w;  m <- mu m + g';
//                  w' = w - eta (g' + mu m) (Nesterov) or w - eta m (heavy ball);  params <- w'
//                  then optionally extrapolate_ from w' along g:
//                  saved <- w';  params <- w' - gamma (g + lam w')
// Hyper-parameters are per segment: chunk c reads row chunk_segments[c] of the [S, kNumHyper] float32
// table (columns.h); a segment whose active column is 0 is left untouched.
#include "chunks.h"
#include "columns.h"

namespace dynbatch {
namespace {

using namespace columns::extrap;  // kLr ... kActive, kNumHyper

template <typename param_t, typename grad_t, bool kZeroDirection>
DYNBATCH_VECTORIZED void extrapolate_chunk(param_t* __restrict params, param_t* __restrict saved,
                                           grad_t* __restrict direction, int64_t start, int64_t end,
                                           float gamma, float lam) {
#pragma omp simd
  for (int64_t i = start; i < end; ++i) {
    const param_t raw = params[i];
    const float w = static_cast<float>(raw);
    saved[i] = raw;
    params[i] = static_cast<param_t>(w - gamma * (static_cast<float>(direction[i]) + lam * w));
    if constexpr (kZeroDirection) direction[i] = grad_t(0);
  }
}

template <typename param_t, typename grad_t, bool kNext>
DYNBATCH_VECTORIZED void step_chunk(param_t* __restrict params, param_t* __restrict saved,
                                    const grad_t* __restrict grad, float* __restrict momentum, int64_t start,
                                    int64_t end, const float* h) {
  const float eta = h[kLr], gamma = h[kGamma], mu = h[kMomentum], lam = h[kWeightDecay];
  const bool nesterov = h[kNesterov] != 0.f;
#pragma omp simd
  for (int64_t i = start; i < end; ++i) {
    const float w = static_cast<float>(saved[i]);
    const float g = static_cast<float>(grad[i]);
    const float decayed = g + lam * w;
    const float m = mu * momentum[i] + decayed;
    momentum[i] = m;
    const float next = w - eta * (nesterov ? decayed + mu * m : m);
    if constexpr (kNext) {
      const param_t stored = static_cast<param_t>(next);
      const float w_next = static_cast<float>(stored);
      saved[i] = stored;
      params[i] = static_cast<param_t>(w_next - gamma * (g + lam * w_next));
    } else {
      params[i] = static_cast<param_t>(next);
    }
  }
}

template <typename T>
struct Type {
  using type = T;
};

#define DYNBATCH_EXTRAP_TYPES(...)                     \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)

// Calls body(Type<param_t>{}, Type<grad_t>{}) for the (parameter, gradient) dtype pair.
template <typename Body>
void dispatch_pair(const at::Tensor& params, const at::Tensor& grad, const Body& body) {
  AT_DISPATCH_SWITCH(params.scalar_type(), "extrap params", DYNBATCH_EXTRAP_TYPES([&] {
                       using param_t = scalar_t;
                       AT_DISPATCH_SWITCH(grad.scalar_type(), "extrap grad", DYNBATCH_EXTRAP_TYPES([&] {
                                            body(Type<param_t>{}, Type<scalar_t>{});
                                          }));
                     }));
}

void check_buffers(const at::Tensor& params, const at::Tensor& saved, const at::Tensor& grad,
                   const at::Tensor& hyper, const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                   const at::Tensor& chunk_segments) {
  TORCH_CHECK(params.is_contiguous() && saved.is_contiguous() && grad.is_contiguous(),
              "params, saved and the gradient must be contiguous");
  TORCH_CHECK(saved.scalar_type() == params.scalar_type(), "saved must have the parameters' dtype");
  TORCH_CHECK(saved.numel() == params.numel() && grad.numel() == params.numel(),
              "saved and the gradient must be as long as params");
  TORCH_CHECK(hyper.scalar_type() == at::kFloat && hyper.is_contiguous() && hyper.dim() == 2 &&
                  hyper.size(1) == kNumHyper,
              "hyper must be a contiguous float32 [S, ", kNumHyper, "] table");
  for (const auto* t : {&chunk_starts, &chunk_ends, &chunk_segments}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->is_cpu(),
                "chunk tables must be contiguous 1-D int64 CPU tensors");
  }
  TORCH_CHECK(chunk_ends.numel() == chunk_starts.numel() && chunk_segments.numel() == chunk_starts.numel(),
              "chunk starts, ends and segments differ in length");
}

void extrapolate_cpu(at::Tensor params, at::Tensor saved, at::Tensor direction, const at::Tensor& hyper,
                     const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                     const at::Tensor& chunk_segments, bool zero_direction) {
  check_buffers(params, saved, direction, hyper, chunk_starts, chunk_ends, chunk_segments);
  const int64_t* starts = chunk_starts.data_ptr<int64_t>();
  const int64_t* ends = chunk_ends.data_ptr<int64_t>();
  const int64_t* segments = chunk_segments.data_ptr<int64_t>();
  const float* h = hyper.data_ptr<float>();
  dispatch_pair(params, direction, [&](auto param_type, auto grad_type) {
    using param_t = typename decltype(param_type)::type;
    using grad_t = typename decltype(grad_type)::type;
    auto* run = zero_direction ? extrapolate_chunk<param_t, grad_t, true>
                               : extrapolate_chunk<param_t, grad_t, false>;
    param_t* p = params.data_ptr<param_t>();
    param_t* s = saved.data_ptr<param_t>();
    grad_t* d = direction.data_ptr<grad_t>();
    at::parallel_for(0, chunk_starts.numel(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const float* row = h + segments[c] * kNumHyper;
        if (row[kActive] != 0.f) run(p, s, d, starts[c], ends[c], row[kGamma], row[kWeightDecay]);
      }
    });
  });
}

void extrap_step_cpu(at::Tensor params, at::Tensor saved, const at::Tensor& grad, at::Tensor momentum,
                     const at::Tensor& hyper, const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                     const at::Tensor& chunk_segments, bool extrapolate_next) {
  check_buffers(params, saved, grad, hyper, chunk_starts, chunk_ends, chunk_segments);
  TORCH_CHECK(momentum.scalar_type() == at::kFloat && momentum.is_contiguous() &&
                  momentum.numel() == params.numel(),
              "momentum must be contiguous float32, as long as params");
  const int64_t* starts = chunk_starts.data_ptr<int64_t>();
  const int64_t* ends = chunk_ends.data_ptr<int64_t>();
  const int64_t* segments = chunk_segments.data_ptr<int64_t>();
  const float* h = hyper.data_ptr<float>();
  dispatch_pair(params, grad, [&](auto param_type, auto grad_type) {
    using param_t = typename decltype(param_type)::type;
    using grad_t = typename decltype(grad_type)::type;
    auto* run = extrapolate_next ? step_chunk<param_t, grad_t, true> : step_chunk<param_t, grad_t, false>;
    param_t* p = params.data_ptr<param_t>();
    param_t* s = saved.data_ptr<param_t>();
    const grad_t* g = grad.data_ptr<grad_t>();
    float* m = momentum.data_ptr<float>();
    at::parallel_for(0, chunk_starts.numel(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const float* row = h + segments[c] * kNumHyper;
        if (row[kActive] != 0.f) run(p, s, g, m, starts[c], ends[c], row);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynbatch_cpp, CPU, m) {
  m.impl("extrapolate_", extrapolate_cpu);
  m.impl("extrap_step_", extrap_step_cpu);
}

}  // namespace dynbatch
