// Software prefetching for the reductions (batch statistics, backward sums), where the hardware prefetcher alone
// leaves them waiting on loads from L3 or memory: it follows one sequential stream, not a stream with jumps.
//
// - channels_last rows, read a strip of channels at a time (sums_by_strips): each strip is a strided stream (256
//   bytes of every 1 KiB row at C = 256). Each strip's lines are asked for 16 KiB ahead, into L2. (32, 256, 14, 14)
//   float32, 2 threads, with and without in one process: the backward reduction 716-837 µs against 1185-1464 with x
//   and dy flushed from the caches before each call, 320-427 against 501-710 unflushed; the training forward
//   1023-1110 against 1291-1419 flushed; in bench_cpu's rounds (separate processes) the BN+ReLU step 1.54-1.65x nn
//   against 1.35-1.36x. Into L1 (T0), every other line, or 2-12 KiB ahead measured slower.
// - NCHW spans, C·inner values apart (sums_over_spans): the next four short spans while four are added, or the next
//   long span, position by position, in a channel-at-a-time pass. (32, 256, 14, 14): the backward reduction 697-710
//   µs against 780-821 flushed, the BN+ReLU step in bench_cpu's rounds 1425-1816 against 1566-2001 µs (one process).
//   (32, 64, 56, 56), channel at a time, flushed or not: the training forward 1986-2140 against 2342-2533 µs, the
//   backward 4051-4095 against 4356-4516; the step 3.00-3.21x nn against 2.54-2.62x in bench_cpu's rounds. Where
//   the next span of a channel is read much later (a reduction in memory order), prefetching it made the reduction
//   25 % slower.
//
// The elementwise passes do not prefetch: their backward 0-10 % faster flushed and up to 9 % slower unflushed, the
// eval no faster flushed and up to 10 % slower unflushed (channels_last (32, 256, 14, 14)).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "../kernel_args.h"

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

// Prefetching of up to three input streams of one dense layout (x; dy; the residual), seen as rows: the interleaved
// rows of C values of channels_last data, or the spans of inner values of planar data. Inactive (prefetches nothing)
// where the streams' data fits in the L2 caches of the threads reading it, which holds it from one pass to the next:
// (8, 512, 7, 7) float32 channels_last (0.8 MB per tensor), the backward reduction took 38 µs without prefetching
// against 44 with it, and the BN+ReLU step 243-310 against 277-325 in bench_cpu's rounds. Null streams are skipped.
class StreamPrefetch {
 public:
  template <typename T>
  StreamPrefetch(const Layout& l, const T* a, const T* b = nullptr, const T* c = nullptr)
      : streams_{reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b), reinterpret_cast<uintptr_t>(c)},
        element_bytes_(sizeof(T)) {
    const int64_t row_elems = l.inner > 1 ? l.inner : l.channels;
    const int64_t row_bytes = std::max<int64_t>(1, row_elems * element_bytes_);
    rows_ahead_ = (kPrefetchAheadBytes + row_bytes - 1) / row_bytes * row_elems;
    const int64_t count = (a != nullptr) + (b != nullptr) + (c != nullptr);
    active_ = l.numel() * element_bytes_ * count > kL2Bytes * at::get_num_threads();
  }

  bool active() const { return active_; }

  // How far ahead rows are prefetched, in elements: the fewest whole rows that span kPrefetchAheadBytes.
  int64_t rows_ahead() const { return rows_ahead_; }

  // The lines of elements [i, i + n) of every stream, into L2.
  void lines(int64_t i, int64_t n) const {
    const uintptr_t offset = static_cast<uintptr_t>(i * element_bytes_);
    const uintptr_t bytes = static_cast<uintptr_t>(n * element_bytes_);
    for (const uintptr_t s : streams_) {
      if (s == 0) continue;
      for (uintptr_t line = (s + offset) / 64 * 64; line < s + offset + bytes; line += 64) prefetch_to_l2(line);
    }
  }

 private:
  std::array<uintptr_t, 3> streams_;
  int64_t element_bytes_;
  int64_t rows_ahead_;
  bool active_;
};

}  // namespace fusedbn::cpu
