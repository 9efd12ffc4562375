// accumulate_'s CPU kernel, shared by its dispatcher registration (accumulate.cpp) and the direct Python
// entry (registration.cpp).
#pragma once

#include <ATen/ATen.h>

namespace dynbatch {

// acc += scale * grad over the chunk table, grad zeroed if zero_grad; the [S, 4] per-segment sums.
at::Tensor accumulate_cpu(at::TensorList acc_list, at::TensorList grad_list, const at::Tensor& host_offsets,
                          const at::Tensor& host_lengths, const at::Tensor& chunk_starts,
                          const at::Tensor& chunk_ends, const at::Tensor& segment_chunks,
                          const at::Tensor& chunk_segments, double scale, bool zero_grad);

}  // namespace dynbatch
