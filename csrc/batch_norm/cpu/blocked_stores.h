// Elementwise outputs stored a block of vectors at a time, after every input of the block has been loaded, where
// the output lies just above an input modulo 4 KiB.
//
// A load whose address matches an earlier, still pending store in its low 12 bits (4 KiB aliasing) waits for that
// store, though the addresses differ. A loop that loads x[i] and stores y[i] one vector at a time meets this when
// y lies just above x modulo 4 KiB: with y − x ≡ 64 bytes, each load aliases the store of the iteration before.
// That is where glibc's malloc puts an output allocated right after its input whenever the input's size is a
// multiple of 4 KiB, as most activations' are (torchvision ResNet-50, batch 8, a long-lived heap: y − x ≡ 64 for 31
// of 159 batch norm calls, within (0, 256] for 45). A standalone copy of the NCHW normalisation loop,
// (32, 256, 14, 14) float32, one thread, data in L3: 242-252 µs at y − x ≡ 64, 204-206 at 128, 195-203 at 192 and
// 256, 186-192 at 0, 173-199 from 512 on; four vectors at a time, 180 at 64 against 225 one at a time. Loading the
// whole block before its first store leaves at most one aliased load per block.
//
// Elsewhere the plain loop runs: where x comes from memory rather than cache (bench_cpu's shuffled rounds with
// torch.compile's runners among them), blocks cost time. There, with this rule instead of blocks everywhere, the
// float32 BN+ReLU steps of bench_cpu's eight cases took 1-9 % less time in 13 of 14 runs and the evals -4 to +9 %
// (HISTORY.md, session 19).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedbn::cpu {

// Whether store_elements can store blocks of vectors here: x86 with AVX (x86 inline asm keeps the block in vector
// registers), float or double.
template <typename T>
constexpr bool kStoresInBlocks =
#if defined(__x86_64__) && defined(__AVX__)
    std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
    false;
#endif

// Whether stores to `out` can wait on loads from `in` at the same index (4 KiB aliasing): out lies 1 to 256 bytes
// above `in` modulo 4 KiB.
inline bool stores_alias_loads(const void* in, const void* out) {
  const uintptr_t d = (reinterpret_cast<uintptr_t>(out) - reinterpret_cast<uintptr_t>(in)) % 4096;
  return d > 0 && d <= 256;
}

// out[j] = f(j) for j in [0, n), in blocks of four vectors where in_blocks (and kStoresInBlocks<T>), else in one
// `omp simd` loop. f is the element's formula. Values are the same either way.
template <typename T, typename F>
inline void store_elements(T* __restrict__ out, int64_t n, const F& f, bool in_blocks) {
  int64_t j0 = 0;
#if defined(__x86_64__) && defined(__AVX__)
  if constexpr (kStoresInBlocks<T>) {
#if defined(__AVX512F__)
    constexpr int64_t kVectorBytes = 64;
#else
    constexpr int64_t kVectorBytes = 32;
#endif
    typedef T Vector __attribute__((vector_size(kVectorBytes)));
    constexpr int64_t kLanes = kVectorBytes / sizeof(T), kBlock = 4 * kLanes;
    for (; in_blocks && j0 + kBlock <= n; j0 += kBlock) {
      // gcc vectorises and unrolls this loop and keeps `block` in registers (no stack round trip).
      alignas(kVectorBytes) T block[kBlock];
#pragma omp simd
      for (int64_t j = 0; j < kBlock; ++j) block[j] = f(j0 + j);
      Vector v0, v1, v2, v3;
      std::memcpy(&v0, block, kVectorBytes);
      std::memcpy(&v1, block + kLanes, kVectorBytes);
      std::memcpy(&v2, block + 2 * kLanes, kVectorBytes);
      std::memcpy(&v3, block + 3 * kLanes, kVectorBytes);
      // Every value of the block is computed (its inputs loaded) before the first store: the compiler may not
      // move a store above this point.
      asm("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));
      std::memcpy(out + j0, &v0, kVectorBytes);
      std::memcpy(out + j0 + kLanes, &v1, kVectorBytes);
      std::memcpy(out + j0 + 2 * kLanes, &v2, kVectorBytes);
      std::memcpy(out + j0 + 3 * kLanes, &v3, kVectorBytes);
    }
  }
#endif
#pragma omp simd
  for (int64_t j = j0; j < n; ++j) out[j] = f(j);
}

}  // namespace fusedbn::cpu
