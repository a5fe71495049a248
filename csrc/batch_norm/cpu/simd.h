// Small numeric helpers for the CPU kernels: vectorised reductions, and per-channel vectors read from
// tensors of any floating dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "convert.h"
#include "prefetch.h"

namespace fusedbn::cpu {

// a − b, bitwise: fma(a, 1, −b) rounds a·1 − b = a − b once, as the subtraction does. The reductions are bound by
// the add units (a subtraction and additions per value); with fused multiply-add units the subtraction runs there
// instead. (8, 512, 7, 7) float32 channels_last statistics, one thread, AMD Zen 4, a standalone copy of the loop of
// session 17 (four rows at a time), data in L2: 14 µs instead of 18.
template <typename T>
inline T subtract_on_fma_unit(T a, T b) {
#if defined(__FMA__)
  return std::fma(a, T(1), -b);
#else
  return a - b;
#endif
}

// The sums Σp and Σp·q (by fused multiply-adds) over rows [row_begin, row_end) of interleaved (channels_last) data,
// f(i, c) = (p, q) at element index i of channel c, for the channels [c0, c0 + W): one row's strip of W values at a
// time, the sums of each kind in vector registers (W = kWidth, a constant; kPartial: the last W < kWidth channels
// of a row, sums in L1), added into the double totals ([0, C) and [C, 2C)) every 64 rows: a sum in float spans at
// most 64 rows. Summed in float over whole work items (8192 rows of (2, 8, 128, 128)), M2 was off by 1.3-2.2e-6
// relative and the eval-mode weight gradient by 8-10e-7; with these flushes, by 4-8e-8 and 1.2-2.8e-7
// (tests/test_stability.py). Rows are prefetched ahead where `prefetch` is active and a strip is narrower than a row
// (prefetch.h).
template <int64_t kWidth, bool kPartial, typename acc_t, typename F>
void strip_sums(int64_t C, int64_t row_begin, int64_t row_end, int64_t c0, int64_t W, const F& f,
                const StreamPrefetch& prefetch, double* total) {
  constexpr int64_t kRowsPerFlush = 64;
  // A strip narrower than the row is a strided stream, which the hardware prefetcher leaves waiting where the
  // data comes from L3 or memory; a strip of the whole row is one sequential stream, which it follows.
  const bool prefetching = prefetch.active() && C > kWidth;
  acc_t s1[kWidth], s2[kWidth];
#pragma omp simd
  for (int64_t c = 0; c < kWidth; ++c) {
    s1[c] = 0;
    s2[c] = 0;
  }
  for (int64_t r = row_begin; r < row_end;) {
    const int64_t flush_at = std::min(row_end, r + kRowsPerFlush);
    for (; r < flush_at; ++r) {
      const int64_t row = r * C + c0;
      if (prefetching) prefetch.lines(row + prefetch.rows_ahead(), kPartial ? W : kWidth);
#pragma omp simd
      for (int64_t c = 0; c < (kPartial ? W : kWidth); ++c) {
        const std::pair<acc_t, acc_t> v = f(row + c, c0 + c);
        s1[c] += v.first;
        s2[c] = std::fma(v.first, v.second, s2[c]);
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < (kPartial ? W : kWidth); ++c) {
      total[c0 + c] += static_cast<double>(s1[c]);
      total[C + c0 + c] += static_cast<double>(s2[c]);
      s1[c] = 0;
      s2[c] = 0;
    }
  }
}

// strip_sums over every channel: strips of kVectors vector lengths of acc_t (64-byte vectors), then of half, a
// quarter and an eighth of that, then the rest. Each strip is one stream of rows C values apart, which the hardware
// prefetcher follows, and its sums stay in registers from row to row. The statistics of channels_last float32, one
// thread, a standalone copy of the loop: C = 256 with the data in L3 (6.4 MB) 103 µs against 149 for four rows at a
// time added to per-channel sums in L1 (with software prefetching), from memory (128 MB) 12.5-13.4 against 14.5 ms,
// C = 512 in L2 11-12 against 14 µs; the op, (32, 64, 56, 56), from memory, 0.76-0.78 against 1.04-1.48 ms.
// f reads the streams of `prefetch`. Returns the totals, Σp at [0, C), Σp·q at [C, 2C).
template <int64_t kVectors, typename acc_t, typename F>
std::vector<double> sums_by_strips(int64_t C, int64_t row_begin, int64_t row_end, const F& f,
                                   const StreamPrefetch& prefetch) {
  constexpr int64_t kWide = kVectors * 64 / sizeof(acc_t);
  static_assert(kWide % 8 == 0);
  std::vector<double> total(2 * C, 0.0);
  int64_t c0 = 0;
  const auto strips = [&]<int64_t kWidth>() {
    for (; c0 + kWidth <= C; c0 += kWidth) {
      strip_sums<kWidth, false, acc_t>(C, row_begin, row_end, c0, kWidth, f, prefetch, total.data());
    }
  };
  strips.template operator()<kWide>();
  strips.template operator()<kWide / 2>();
  strips.template operator()<kWide / 4>();
  strips.template operator()<kWide / 8>();
  if (c0 < C) strip_sums<kWide / 8, true, acc_t>(C, row_begin, row_end, c0, C - c0, f, prefetch, total.data());
  return total;
}

// Spans of at most this many values are added column by column by sums_over_spans.
constexpr int64_t kColumnSumMaxSpan = 1024;
// A single span shorter than this is summed in one loop by sums_over_spans: in lanes, it would take fewer than
// four passes over them, and their remainder and horizontal sum would cost more than its additions.
constexpr int64_t kLaneMinSpan = 256;
// Consecutive positions of a long span are added to this many lane sums (four 16-wide vectors): independent
// additions, where one vector accumulator waits for the previous add.
constexpr int64_t kLanes = 64;

// The two sums of f(offset(o) + j) = (a, b) over spans o in [o0, o1) and positions j in [0, len), in double; f
// returns a std::pair<acc_t, acc_t>.
//
// A plain `omp simd` reduction keeps one vector accumulator, so the add latency bounds it (≈ 3 cycles per 8
// values), and it ends with a lane-by-lane horizontal sum, which for the 49-value spans of 7 × 7 images cost
// more than the span's own additions. Instead:
//  - several short spans: four spans at a time, (v0 + v1) + (v2 + v3) at each position, added to column buffers
//    (element j), reduced once at the end;
//  - long spans: position j of each run of kLanes consecutive positions added to lane j, read in memory order.
//    (Adding a span's four quarters together, four streams a quarter span apart, read data from memory 2.4×
//    slower at (32, 64, 56, 56): the hardware prefetcher does not follow four short streams.)
//  - a single span shorter than kLaneMinSpan (N = 1, images up to 15 × 15), which needs one horizontal sum
//    whichever way it is added: one plain reduction.
// The order of the additions depends only on the shape. f is taken by value: through a reference gcc reloaded
// its captured pointer in every iteration and vectorised the loads as gathers.
//
// Where `prefetch` is active, the spans read next, which lie C·inner values away, are prefetched: the next four
// short spans while four are added; the next long span position by position, the last span's successor being
// `next_offset` (the offset of the span read after this call, in a channel-at-a-time pass; −1: none, or it follows
// in memory, where the hardware prefetcher finds it).
template <typename acc_t, typename Offset, typename F>
std::pair<double, double> sums_over_spans(int64_t o0, int64_t o1, int64_t len, const Offset& offset, F f,
                                          const StreamPrefetch& prefetch, int64_t next_offset) {
  using Sums = std::pair<acc_t, acc_t>;
  const auto sum4 = [f](int64_t r0, int64_t r1, int64_t r2, int64_t r3, int64_t j) {
    const Sums v0 = f(r0 + j), v1 = f(r1 + j), v2 = f(r2 + j), v3 = f(r3 + j);
    return Sums((v0.first + v1.first) + (v2.first + v3.first), (v0.second + v1.second) + (v2.second + v3.second));
  };
  if (o1 - o0 == 1 && len < kLaneMinSpan) {
    const int64_t b = offset(o0);
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < len; ++j) {
      const Sums v = f(b + j);
      s1 += v.first;
      s2 += v.second;
    }
    return {s1, s2};
  }
  double t1 = 0, t2 = 0;
  if (len > kColumnSumMaxSpan || o1 - o0 < 2) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t b = offset(o);
      alignas(64) acc_t lane1[kLanes] = {}, lane2[kLanes] = {};
      int64_t j = 0;
      const int64_t next = o + 1 < o1 ? offset(o + 1) : next_offset;
      const bool prefetching = prefetch.active() && next >= 0;
      for (; j + kLanes <= len; j += kLanes) {
        if (prefetching) prefetch.lines(next + j, kLanes);
#pragma omp simd
        for (int64_t k = 0; k < kLanes; ++k) {
          const Sums v = f(b + j + k);
          lane1[k] += v.first;
          lane2[k] += v.second;
        }
      }
      acc_t s1 = 0, s2 = 0;
      for (; j < len; ++j) {
        const Sums v = f(b + j);
        s1 += v.first;
        s2 += v.second;
      }
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t k = 0; k < kLanes; ++k) {
        s1 += lane1[k];
        s2 += lane2[k];
      }
      t1 += s1;
      t2 += s2;
    }
  } else {
    alignas(64) acc_t col1[kColumnSumMaxSpan], col2[kColumnSumMaxSpan];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      col1[j] = 0;
      col2[j] = 0;
    }
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
      const int64_t b0 = offset(o), b1 = offset(o + 1), b2 = offset(o + 2), b3 = offset(o + 3);
      if (prefetch.active()) {
        for (int64_t k = o + 4; k < std::min(o1, o + 8); ++k) prefetch.lines(offset(k), len);
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const Sums v = sum4(b0, b1, b2, b3, j);
        col1[j] += v.first;
        col2[j] += v.second;
      }
    }
    for (; o < o1; ++o) {
      const int64_t b = offset(o);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const Sums v = f(b + j);
        col1[j] += v.first;
        col2[j] += v.second;
      }
    }
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t j = 0; j < len; ++j) {
      s1 += col1[j];
      s2 += col2[j];
    }
    t1 = s1;
    t2 = s2;
  }
  return {t1, t2};
}

// The C values of a 1-D tensor of any floating dtype as T, or C copies of `fill` if it is undefined.
template <typename T>
std::vector<T> channel_vector(const at::Tensor& t, int64_t channels, T fill) {
  std::vector<T> out(channels, fill);
  if (!t.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fusedbn_channel_vector", [&] {
    const auto a = t.accessor<scalar_t, 1>();
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<T>(a[c]);
  });
  return out;
}

// Writes values into a 1-D tensor of any floating dtype.
template <typename T>
void store_channel_vector(at::Tensor& t, const std::vector<T>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fusedbn_store_channel_vector", [&] {
    auto a = t.accessor<scalar_t, 1>();
    for (size_t c = 0; c < values.size(); ++c) a[c] = static_cast<scalar_t>(values[c]);
  });
}

}  // namespace fusedbn::cpu
