// extrapolate_ and extrap_step_: the two fused passes of extrapolated SGD (dynbatch_kernels/ops/extrap.py).
//   extrapolate_:  saved <- w;  w <- w - gamma (d + lam w);  d <- 0 (optional)
//   extrap_step_:  from w = saved:  g' = g + lam w;  m <- mu m + g';
//                  w' = w - eta (g' + mu m) (Nesterov) or w - eta m (heavy ball);  params <- w'
//                  then optionally extrapolate_ from w' along g:
//                  saved <- w';  params <- w' - gamma (g + lam w')
// Hyper-parameters are per segment: chunk c reads row chunk_segments[c] of the [S, kNumHyper] float32
// table (columns.h); a segment whose active column is 0 is left untouched. Every tensor operand is a flat
// buffer or one tensor per segment (chunks.h).
#include "chunks.h"
#include "columns.h"
#include "direct.h"

namespace dynbatch {
namespace {

using namespace columns::extrap;  // kLr ... kActive, kNumHyper

template <typename param_t, typename grad_t, bool kZeroDirection>
DYNBATCH_VECTORIZED void extrapolate_chunk(param_t* __restrict params, param_t* __restrict saved,
                                           grad_t* __restrict direction, int64_t n, float gamma, float lam) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const param_t raw = params[i];
    const float w = static_cast<float>(raw);
    saved[i] = raw;
    params[i] = static_cast<param_t>(w - gamma * (static_cast<float>(direction[i]) + lam * w));
    if constexpr (kZeroDirection) direction[i] = grad_t(0);
  }
}

template <typename param_t, typename grad_t, bool kNext>
DYNBATCH_VECTORIZED void step_chunk(param_t* __restrict params, param_t* __restrict saved,
                                    const grad_t* __restrict grad, float* __restrict momentum, int64_t n,
                                    const float* h) {
  const float eta = h[kLr], gamma = h[kGamma], mu = h[kMomentum], lam = h[kWeightDecay];
  const bool nesterov = h[kNesterov] != 0.f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
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
void dispatch_pair(at::ScalarType params, at::ScalarType grad, const Body& body) {
  AT_DISPATCH_SWITCH(params, "extrap params", DYNBATCH_EXTRAP_TYPES([&] {
                       using param_t = scalar_t;
                       AT_DISPATCH_SWITCH(grad, "extrap grad", DYNBATCH_EXTRAP_TYPES([&] {
                                            body(Type<param_t>{}, Type<scalar_t>{});
                                          }));
                     }));
}

void check_hyper(const at::Tensor& hyper, int64_t num_segments) {
  TORCH_CHECK(hyper.scalar_type() == at::kFloat && hyper.is_cpu() && hyper.is_contiguous() &&
                  hyper.dim() == 2 && hyper.size(0) == num_segments && hyper.size(1) == kNumHyper,
              "hyper must be a contiguous float32 CPU [", num_segments, ", ", kNumHyper, "] table");
}

// Runs chunk(hyper row, segment, start, n) for every chunk of an active segment, in parallel.
template <typename Fn>
void for_active_chunks(const Chunks& t, const float* hyper, const Fn& chunk) {
  at::parallel_for(0, t.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t seg = t.chunk_segments[c], lo = t.starts[c];
      const float* row = hyper + seg * kNumHyper;
      if (row[kActive] != 0.f) chunk(row, seg, lo, t.ends[c] - lo);
    }
  });
}

void extrapolate_cpu(at::TensorList params_list, at::TensorList saved_list, at::TensorList direction_list,
                     const at::Tensor& hyper, const at::Tensor& host_offsets, const at::Tensor& host_lengths,
                     const at::Tensor& chunk_starts, const at::Tensor& chunk_ends,
                     const at::Tensor& segment_chunks, const at::Tensor& chunk_segments,
                     bool zero_direction) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Operand params = cpu_operand("params", params_list, table);
  const Operand saved = cpu_operand("saved", saved_list, table, params.dtype);
  const Operand direction = cpu_operand("direction", direction_list, table);
  check_hyper(hyper, table.layout.num_segments);
  const float* h = hyper.const_data_ptr<float>();
  const at::ScalarType param_dtype = dtype_or(params, at::kFloat);
  dispatch_pair(param_dtype, dtype_or(direction, at::kFloat), [&](auto param_type, auto grad_type) {
    using param_t = typename decltype(param_type)::type;
    using grad_t = typename decltype(grad_type)::type;
    auto* run = zero_direction ? extrapolate_chunk<param_t, grad_t, true>
                               : extrapolate_chunk<param_t, grad_t, false>;
    for_active_chunks(table, h, [&](const float* row, int64_t seg, int64_t lo, int64_t n) {
      run(params.chunk<param_t>(seg, lo), saved.chunk<param_t>(seg, lo), direction.chunk<grad_t>(seg, lo),
          n, row[kGamma], row[kWeightDecay]);
    });
  });
}

void extrap_step_cpu(at::TensorList params_list, at::TensorList saved_list, at::TensorList grad_list,
                     at::TensorList momentum_list, const at::Tensor& hyper, const at::Tensor& host_offsets,
                     const at::Tensor& host_lengths, const at::Tensor& chunk_starts,
                     const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                     const at::Tensor& chunk_segments, bool extrapolate_next) {
  const Chunks table =
      check_chunks(host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks, chunk_segments);
  const Operand params = cpu_operand("params", params_list, table);
  const Operand saved = cpu_operand("saved", saved_list, table, params.dtype);
  const Operand grad = cpu_operand("grad", grad_list, table);
  const Operand momentum = cpu_operand("momentum", momentum_list, table, at::kFloat);
  check_hyper(hyper, table.layout.num_segments);
  const float* h = hyper.const_data_ptr<float>();
  const at::ScalarType param_dtype = dtype_or(params, at::kFloat);
  dispatch_pair(param_dtype, dtype_or(grad, at::kFloat), [&](auto param_type, auto grad_type) {
    using param_t = typename decltype(param_type)::type;
    using grad_t = typename decltype(grad_type)::type;
    auto* run = extrapolate_next ? step_chunk<param_t, grad_t, true> : step_chunk<param_t, grad_t, false>;
    for_active_chunks(table, h, [&](const float* row, int64_t seg, int64_t lo, int64_t n) {
      run(params.chunk<param_t>(seg, lo), saved.chunk<param_t>(seg, lo), grad.chunk<const grad_t>(seg, lo),
          momentum.chunk<float>(seg, lo), n, row);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynbatch_cpp, CPU, m) {
  m.impl("extrapolate_", extrapolate_cpu);
  m.impl("extrap_step_", extrap_step_cpu);
}
DYNBATCH_DIRECT(extrapolate_, extrapolate_cpu);
DYNBATCH_DIRECT(extrap_step_, extrap_step_cpu);

}  // namespace dynbatch
