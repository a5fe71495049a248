// Non-temporal ("streaming") stores for the forward output of a pass too large for the last-level cache.
//
// A store to a line that is not in cache first reads the line from memory (read for ownership), so writing an
// output moves each byte twice. A non-temporal store writes whole lines without reading them, past the cache. That
// loses where the next layer would find the output in cache, and gains where it would not: when a pass moves more
// bytes (inputs read, output written) than the last-level cache holds, the start of the output has been evicted
// before the pass ends, and a consumer reading it in order finds none of it in cache. (32, 64, 56, 56) float32
// (51 MB moved, 32 MiB L3), 2 threads, both ways in one process (bench_cpu's shuffled rounds): eval 1.47 -> 1.15 ms
// NCHW, 1.64 -> 1.23 channels_last; training forward 2.44 -> 2.05 NCHW, 2.68 -> 2.27 channels_last; the BN+ReLU
// step 2 % faster. Streaming dx in the backward pass measured no gain (not used).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace fusedbn::cpu {

// The largest cache cpu0 has, from Linux's sysfs (the shared L3 of its core complex). glibc's sysconf reported the
// whole package's L3 in this project's VM (320 MiB against 32 MiB); 32 MiB, a core complex of AMD Zen 3 and 4,
// where sysfs says nothing.
inline int64_t read_last_level_cache_bytes() {
  constexpr int64_t kFallbackBytes = int64_t{32} << 20;
  int64_t largest = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    std::string size;  // "32768K"
    if (!(file >> size) || size.empty() || size[0] < '0' || size[0] > '9') break;
    const int64_t unit = size.back() == 'K' ? 1024 : size.back() == 'M' ? (1 << 20) : 1;
    largest = std::max(largest, static_cast<int64_t>(std::stoll(size)) * unit);
  }
  return largest > 0 ? largest : kFallbackBytes;
}

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = read_last_level_cache_bytes();
  return bytes;
}

// Whether a pass that reads and writes `bytes_moved` bytes in all writes its output with streaming stores (never in
// a build without AVX, where stream_copy would be a plain copy).
inline bool streams_output(int64_t bytes_moved) {
#if defined(__AVX__)
  return bytes_moved > last_level_cache_bytes();
#else
  return false;
#endif
}

// dst[0, n) = src[0, n): the whole 64-byte lines of dst with non-temporal stores, the partial ones at either end
// with ordinary stores. Callers end with streaming_fence().
template <typename T>
inline void stream_copy(const T* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const char* s = reinterpret_cast<const char*>(src);
  char* d = reinterpret_cast<char*>(dst);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
#if defined(__AVX__)
  i = std::min<int64_t>(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, i);
  for (; i + 64 <= bytes; i += 64) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
  }
#endif
  std::memcpy(d + i, s + i, bytes - i);
}

// Orders the streaming stores before what follows (they are weakly ordered): another thread that reads the
// output after the pass sees them.
inline void streaming_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace fusedbn::cpu
