// Streaming (non-temporal) stores for results written to a buffer the same pass never reads.
//
// A plain store to a line that is not in the cache first reads the line from memory (write-allocate), so
// writing n bytes to a cold buffer moves 2n. Streaming stores write whole lines without that read. They pay
// off only when the buffer is too large to stay cached until it is read back: kStreamMinBytes.
// x86-64 only (the width of the stores is picked when the library loads); elsewhere plain copies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define DYNBATCH_STREAMING_STORES 1
#endif

namespace dynbatch {

// Buffers from this size on get streaming stores (lamb_update_; lamb_step_ decides per wave): beside the
// four to six other streams of a fused pass, a result this large no longer survives in a last-level cache
// of a few tens of MiB until the next pass.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

#ifdef DYNBATCH_STREAMING_STORES
// dst[0, 64 * lines) = src[...] through streaming stores, dst 64-byte aligned: one 64-byte store per line
// where the CPU has AVX-512 (four 16-byte stores per line leave lines half written in the write-combining
// buffers for longer: lamb_step_ 1.12x against 1.03x the time of u written over the gradient, on
// BERT-base's embedding, ad hoc A/B on a Xeon), else four 16-byte stores. Picked when the library loads.
__attribute__((target("avx512f"))) inline void stream_lines(char* dst, const char* src, int64_t lines) {
  for (int64_t i = 0; i < lines * 64; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  }
}

__attribute__((target("default"))) inline void stream_lines(char* dst, const char* src, int64_t lines) {
  for (int64_t i = 0; i < lines * 64; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
}
#endif

// dst[0, bytes) = src[0, bytes) with streaming stores for the whole 64-byte lines of dst.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#ifdef DYNBATCH_STREAMING_STORES
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  const int64_t lines = (bytes - head) / 64;
  std::memcpy(d, s, head);
  stream_lines(d + head, s + head, lines);
  std::memcpy(d + head + lines * 64, s + head + lines * 64, bytes - head - lines * 64);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Orders this thread's streaming stores before its later stores (e.g. the end of a parallel region, after
// which other threads read the buffer).
inline void stream_fence() {
#ifdef DYNBATCH_STREAMING_STORES
  _mm_sfence();
#endif
}

}  // namespace dynbatch
