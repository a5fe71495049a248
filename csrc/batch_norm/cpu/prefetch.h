// Software prefetching for the reductions over channels_last rows.
//
// sums_by_strips reads a row C values wide a strip at a time, so each strip is a strided stream (256 bytes of every 1
// KiB row at C = 256). Where the data comes from L3 or memory, the hardware prefetcher leaves such a loop waiting on
// loads; asking for each strip's lines 16 KiB ahead, into L2, keeps enough misses in flight. (32, 256, 14, 14) float32,
// 2 threads, with and without prefetching in one process: the backward reduction 716-837 µs against 1185-1464 with x
// and dy flushed from the caches before each call, 340-418 against 501-710 without flushing; the training forward
// (statistics, then normalisation) 1023-1110 against 1291-1419 flushed; in bench_cpu's rounds the BN+ReLU step of the
// channels_last case 1.54-1.65x nn against 1.35-1.36x. Into L1 (T0), every other line, or 2-12 KiB ahead measured
// slower. The elementwise passes do not prefetch: their backward 0-10 % faster flushed and up to 9 % slower unflushed,
// the eval no faster flushed and up to 10 % slower unflushed.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace fusedbn::cpu {

// How far ahead of the row being read the prefetched row lies.
constexpr int64_t kPrefetchAheadBytes = 16384;
// The L2 cache of one core (AMD Zen 4; 1-2 MiB on recent x86 cores).
constexpr int64_t kL2Bytes = 1024 * 1024;

// The line holding address `p` into L2 (an integer: it may lie past the end of a tensor, and a prefetch never
// faults). In inline assembly: gcc 12 deleted loops whose only statements were _mm_prefetch calls (at -O1 and -O2
// always, at -O3 in some), as loops without side effects.
inline void prefetch_to_l2(uintptr_t p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 (%0)" : : "r"(p));
#else
  (void)p;
#endif
}

// Prefetches, for up to three input streams of equal layout (x; dy; the residual), the elements a whole number of
// rows ahead of a given element; inactive (prefetches nothing) where the streams' data fits in the L2 caches of the
// threads reading it, which holds it from one pass to the next: (8, 512, 7, 7) float32 (0.8 MB per tensor), the
// reduction took 38 µs without prefetching against 44 with it, and the BN+ReLU step 243-310 against 277-325 in
// bench_cpu's rounds. Null streams are skipped.
class RowPrefetch {
 public:
  template <typename T>
  RowPrefetch(int64_t rows, int64_t row_elems, const T* a, const T* b = nullptr, const T* c = nullptr)
      : streams_{reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b), reinterpret_cast<uintptr_t>(c)},
        element_bytes_(sizeof(T)) {
    const int64_t row_bytes = std::max<int64_t>(1, row_elems * element_bytes_);
    ahead_ = (kPrefetchAheadBytes + row_bytes - 1) / row_bytes * row_elems;
    const int64_t count = (a != nullptr) + (b != nullptr) + (c != nullptr);
    active_ = rows * row_bytes * count > kL2Bytes * at::get_num_threads();
  }

  bool active() const { return active_; }

  // The lines of elements [i, i + n) + ahead of every stream, into L2.
  void operator()(int64_t i, int64_t n) const {
    const uintptr_t offset = static_cast<uintptr_t>((i + ahead_) * element_bytes_);
    const uintptr_t bytes = static_cast<uintptr_t>(n * element_bytes_);
    for (const uintptr_t s : streams_) {
      if (s == 0) continue;
      for (uintptr_t line = (s + offset) / 64 * 64; line < s + offset + bytes; line += 64) prefetch_to_l2(line);
    }
  }

 private:
  std::array<uintptr_t, 3> streams_;
  int64_t element_bytes_;
  int64_t ahead_;  // elements
  bool active_;
};

}  // namespace fusedbn::cpu
