// Streaming (non-temporal) stores for results written to a buffer the same pass never reads.
//
// A plain store to a line that is not in the cache first reads the line from memory (write-allocate), so
// writing n bytes to a cold buffer moves 2n. Streaming stores write whole lines without that read. They pay
// off only when the buffer is too large to stay cached until it is read back: kStreamMinBytes.
// x86-64 (SSE2 is part of the baseline ISA, so every target clone may call these); elsewhere plain copies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <emmintrin.h>
#define DYNBATCH_STREAMING_STORES 1
#endif

namespace dynbatch {

// Buffers from this size on get streaming stores (lamb_update_; lamb_step_ decides per wave): beside the
// four to six other streams of a fused pass, a result this large no longer survives in a last-level cache
// of a few tens of MiB until the next pass.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

// dst[0, bytes) = src[0, bytes) with streaming stores for the 16-byte-aligned body of dst.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#ifdef DYNBATCH_STREAMING_STORES
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
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
