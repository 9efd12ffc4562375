// Shared helpers for the CPU kernels: the chunk table, the operands (where each segment lives) and the
// chunk -> segment reduction (dynbatch_kernels/chunks.py describes the table).
//
// Segment j occupies virtual indices [offsets[j], offsets[j] + lengths[j]); the rest of its room, up to
// offsets[j+1], is padding no kernel touches. Each segment is cut into chunks of at most `chunk_size`
// elements that never cross a segment boundary: chunk c covers [starts[c], ends[c]) of segment
// chunk_segments[c]; segment j owns chunks [segment_chunks[j], segment_chunks[j+1]).
//
// Every tensor operand is a list: one flat buffer laid out in the virtual index space (element i at
// flat[i]), or one tensor per segment (element i of segment j at tensors[j].view(-1)[i - offsets[j]]),
// wherever each of them lives. check_operand validates a list and gives each chunk's first element, so a
// chunk kernel only ever sees (pointers, count).
//
// Kernels write K partial sums per chunk into a [C, K] float32 buffer; reduce_chunks sums them per
// segment in chunk order (float64 accumulation), so results are bit-identical run to run whatever the
// thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

// Elementwise chunk loops are compiled three times (AVX-512, AVX2, baseline x86-64) and the best one the
// CPU supports is picked when the library loads (GCC/Clang function multiversioning); elsewhere, once.
#if defined(__x86_64__) && defined(__GNUC__)
#define DYNBATCH_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DYNBATCH_VECTORIZED
#endif

namespace dynbatch {

// Where the segments sit in the virtual index space: host tables only (never device memory).
struct Layout {
  const int64_t* offsets;  // [S+1]
  const int64_t* lengths;  // [S], lengths[j] <= offsets[j+1] - offsets[j]
  int64_t num_segments;
  int64_t num_elements;  // the length of a flat buffer
};

// The chunk table as the kernels take it: ChunkTable's host_offsets, host_lengths, starts, ends,
// segment_chunks and chunk_segments, all contiguous 1-D int64 CPU tensors.
struct Chunks {
  Layout layout;
  const int64_t* starts;          // [C]
  const int64_t* ends;            // [C]
  const int64_t* segment_chunks;  // [S+1]
  const int64_t* chunk_segments;  // [C]
  int64_t num_chunks;
};

inline void check_index_table(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.is_cpu(),
                    "chunk table: ", name, ": expected a contiguous 1-D int64 CPU tensor, got ", t.dim(),
                    "-D ", t.scalar_type(), " on ", t.device());
}

// host_offsets [S+1] and host_lengths [S]; num_elements: the last offset (a flat buffer's length).
inline Layout check_layout(const at::Tensor& offsets, const at::Tensor& lengths, int64_t num_elements) {
  check_index_table(offsets, "host_offsets");
  check_index_table(lengths, "host_lengths");
  TORCH_CHECK_VALUE(offsets.numel() >= 1, "chunk table: host_offsets needs at least one entry");
  const int64_t num_segments = offsets.numel() - 1;
  TORCH_CHECK_VALUE(lengths.numel() == num_segments, "chunk table: expected ", num_segments,
                    " host_lengths (one per segment), got ", lengths.numel());
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[num_segments] == num_elements, "chunk table: expected the last offset to equal ",
                    "num_elements ", num_elements, ", got ", off[num_segments]);
  return {off, lengths.const_data_ptr<int64_t>(), num_segments, num_elements};
}

inline Chunks check_chunks(const at::Tensor& offsets, const at::Tensor& lengths, const at::Tensor& starts,
                           const at::Tensor& ends, const at::Tensor& segment_chunks,
                           const at::Tensor& chunk_segments) {
  check_index_table(offsets, "host_offsets");
  TORCH_CHECK_VALUE(offsets.numel() >= 1, "chunk table: host_offsets needs at least one entry");
  const int64_t num_elements = offsets.const_data_ptr<int64_t>()[offsets.numel() - 1];
  const Layout layout = check_layout(offsets, lengths, num_elements);
  check_index_table(starts, "chunk_starts");
  check_index_table(ends, "chunk_ends");
  check_index_table(segment_chunks, "segment_chunks");
  check_index_table(chunk_segments, "chunk_segments");
  const int64_t num_chunks = starts.numel();
  TORCH_CHECK_VALUE(ends.numel() == num_chunks && chunk_segments.numel() == num_chunks,
                    "chunk table: chunk_starts, chunk_ends and chunk_segments differ in length (", num_chunks,
                    ", ", ends.numel(), ", ", chunk_segments.numel(), ")");
  TORCH_CHECK_VALUE(segment_chunks.numel() == layout.num_segments + 1, "chunk table: expected ",
                    layout.num_segments + 1, " segment_chunks entries, got ", segment_chunks.numel());
  const int64_t* seg = segment_chunks.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(seg[layout.num_segments] == num_chunks, "chunk table: segment_chunks ends at ",
                    seg[layout.num_segments], ", expected the number of chunks ", num_chunks);
  return {layout,
          starts.const_data_ptr<int64_t>(),
          ends.const_data_ptr<int64_t>(),
          seg,
          chunk_segments.const_data_ptr<int64_t>(),
          num_chunks};
}

// Software prefetch for chunk loops that do more per element than copy or add (reductions, several
// streams): their loop bodies are longer, so the out-of-order window holds fewer of their loads in flight
// than the memory's latency needs. Fetching each stream kAheadBytes ahead restores that (accumulate_ at
// 2^24 float32 elements, 2 threads: 1.17-1.21x the time of a bare add_ without, 1.00-1.02x with; ad hoc
// A/B on a Xeon).
constexpr int64_t kAheadBytes = 4096;

// Prefetches the 64-byte lines of the bytes [from, to) of p (nothing where p is null).
inline void prefetch_bytes(const void* p, int64_t from, int64_t to) {
  if (p == nullptr) return;
  for (int64_t at = from; at < to; at += 64) __builtin_prefetch(static_cast<const char*>(p) + at);
}

// Prefetches the lines of x[lo, hi) moved kAheadBytes ahead, those below x[n]: n is Operand::room, the end
// of the memory x is in (past a separately allocated tensor's end they would be wasted reads).
template <typename T>
inline void prefetch_ahead(const T* x, int64_t lo, int64_t hi, int64_t n) {
  const int64_t size = static_cast<int64_t>(sizeof(T));
  prefetch_bytes(x, lo * size + kAheadBytes, std::min(hi * size + kAheadBytes, n * size));
}

// A dtype as Python prints it ("torch.float32"), for messages.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// One checked operand (check_operand): where each segment's elements live.
struct Operand {
  bool flat = false;
  std::vector<void*> data;  // flat: {the buffer}; else each segment's tensor (element offsets[j])
  const int64_t* offsets = nullptr;
  const int64_t* lengths = nullptr;
  int64_t num_elements = 0;
  std::optional<at::ScalarType> dtype;  // the tensors' dtype and device; none for an empty list
  std::optional<at::Device> device;

  bool empty() const { return data.empty(); }

  // The element `start` (a virtual index in segment `segment`): a chunk's first element.
  template <typename T>
  T* chunk(int64_t segment, int64_t start) const {
    if (flat) return static_cast<T*>(data[0]) + start;
    return static_cast<T*>(data[segment]) + (start - offsets[segment]);
  }

  // The elements from the element `start` (in segment `segment`) to the end of the buffer or tensor it is in.
  int64_t room(int64_t segment, int64_t start) const {
    return (flat ? num_elements : offsets[segment] + lengths[segment]) - start;
  }
};

// Checks a list operand against `layout` and reads its tensors' addresses (never their memory):
//   [flat]: one contiguous tensor of num_elements elements (any shape);
//   S tensors: each contiguous with lengths[j] elements, all of one dtype and device.
// `name` ("grad") prefixes the messages; "" for none. Raises ValueError / TypeError.
inline Operand check_operand(const char* name, at::TensorList tensors, const Layout& layout) {
  const char* sep = name[0] != '\0' ? ": " : "";
  Operand op;
  op.offsets = layout.offsets;
  op.lengths = layout.lengths;
  op.num_elements = layout.num_elements;
  const int64_t count = static_cast<int64_t>(tensors.size());
  if (count == 1 && tensors[0].numel() == layout.num_elements) {
    const at::Tensor& flat = tensors[0];
    TORCH_CHECK_VALUE(flat.is_contiguous(), name, sep, "expected a contiguous buffer, got stride ",
                      flat.strides());
    op.flat = true;
    op.data.push_back(flat.data_ptr());
    op.dtype = flat.scalar_type();
    op.device = flat.device();
    return op;
  }
  TORCH_CHECK_VALUE(count == layout.num_segments, name, sep, "expected ", layout.num_segments,
                    " tensors (one per segment) or one flat buffer of ", layout.num_elements,
                    " elements, got ",
                    count == 1 ? "one tensor of " + std::to_string(tensors[0].numel()) + " elements"
                               : "a list of " + std::to_string(count));
  if (count == 0) return op;
  const at::Tensor& first = tensors[0];
  const at::ScalarType dtype = first.scalar_type();
  const at::Device device = first.device();
  op.data.resize(count);
  for (int64_t j = 0; j < count; ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK_TYPE(t.scalar_type() == dtype && t.device() == device, name, sep, "segment ", j,
                     ": expected ", dtype_name(dtype), " on ", device, " like segment 0, got ",
                     dtype_name(t.scalar_type()), " on ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, sep, "segment ", j,
                      ": expected a contiguous tensor, got stride ", t.strides());
    TORCH_CHECK_VALUE(t.numel() == layout.lengths[j], name, sep, "segment ", j, ": expected ",
                      layout.lengths[j], " elements, got ", t.numel());
    op.data[j] = t.data_ptr();
  }
  op.dtype = dtype;
  op.device = device;
  return op;
}

// check_operand, then: a CPU operand of dtype `dtype` (if given).
inline Operand cpu_operand(const char* name, at::TensorList tensors, const Chunks& table,
                           std::optional<at::ScalarType> dtype = std::nullopt) {
  Operand op = check_operand(name, tensors, table.layout);
  if (op.empty()) return op;
  TORCH_CHECK_VALUE(op.device->is_cpu(), name, ": expected CPU tensors, got ", *op.device);
  if (dtype) {
    TORCH_CHECK_TYPE(*op.dtype == *dtype, name, ": expected ", dtype_name(*dtype), ", got ",
                     dtype_name(*op.dtype));
  }
  return op;
}

// The dtype to dispatch on: the operand's, or `fallback` for an empty list (no chunks to run).
inline at::ScalarType dtype_or(const Operand& op, at::ScalarType fallback) {
  return op.dtype.value_or(fallback);
}

// Rows [first, last) of dst ([S, K] float32): each segment's rows of partials ([C, K] float32) summed in
// chunk order, in float64.
inline void sum_segments(const float* partials, int64_t k, const Chunks& table, int64_t first, int64_t last,
                         float* dst) {
  const int64_t* seg = table.segment_chunks;
  for (int64_t j = first; j < last; ++j) {
    for (int64_t col = 0; col < k; ++col) {
      double total = 0.0;
      for (int64_t c = seg[j]; c < seg[j + 1]; ++c) total += partials[c * k + col];
      dst[j * k + col] = static_cast<float>(total);
    }
  }
}

// partials: [C, K] float32 -> [S, K] float32, summing each segment's chunks in order.
inline at::Tensor reduce_chunks(const std::vector<float>& partials, int64_t k, const Chunks& table) {
  auto out = at::empty({table.layout.num_segments, k}, at::TensorOptions().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, table.layout.num_segments, 64, [&](int64_t begin, int64_t end) {
    sum_segments(partials.data(), k, table, begin, end, dst);
  });
  return out;
}

}  // namespace dynbatch
