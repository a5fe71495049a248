// Per-channel batch moments (mean, M2) in one pass over memory: each work item (a few KiB, resident in L1)
// is summed for a provisional mean (the shift), then its deviations from the shift are summed; the items are
// merged with Chan's formula in double. Never E[x²] − E[x]².
//
// Precision: the shift only needs to be close to the item's mean. mean = shift + Σd/n and
// M2 = Σd² − (Σd)²/n are exact for any shift, and with d small the float sums of d are accurate, so the mean
// ends within about one float32 ulp (tests/test_stability.py) without summing x itself in double.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "../common/welford.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

using Stats = Moments<double>;

// Moments of n values from the sums of their deviations d = x − shift: mean = shift + Σd/n and
// M2 = Σd² − (Σd)²/n (exact for any shift; accurate because the shift is the item's own mean).
Stats moments_from_deviations(double n, double mean, double sum_d, double sum_d2) {
  return {n, mean, std::max(0.0, sum_d2 - sum_d * sum_d / n)};
}

template <typename scalar_t>
Stats span_item_moments(const scalar_t* x, const Layout& l, const SpanItem& it) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t len = it.inner_end - it.inner_begin;
  auto span = [&](int64_t o) { return x + (o * l.channels + it.channel) * l.inner + it.inner_begin; };
  opmath_t sum = 0;
  for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
    const scalar_t* xs = span(o);
    sum += simd_sum<opmath_t>(len, [&](int64_t i) { return static_cast<opmath_t>(xs[i]); });
  }
  const double n = static_cast<double>((it.outer_end - it.outer_begin) * len);
  const opmath_t shift = static_cast<opmath_t>(static_cast<double>(sum) / n);
  double sum_d = 0, sum_d2 = 0;
  for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
    const scalar_t* xs = span(o);
    const auto [d1, d2] = simd_sum2<opmath_t>(len, [&](int64_t i) {
      const opmath_t d = static_cast<opmath_t>(xs[i]) - shift;
      return std::pair<opmath_t, opmath_t>(d, d * d);
    });
    sum_d += d1;
    sum_d2 += d2;
  }
  return moments_from_deviations(n, static_cast<double>(shift) + sum_d / n, sum_d, sum_d2);
}

template <typename scalar_t>
void row_item_moments(const scalar_t* x, const Layout& l, int64_t row_begin, int64_t row_end, Stats* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const double n = static_cast<double>(row_end - row_begin);
  for_channel_blocks(C, [&](int64_t c0, auto width) {
    constexpr int64_t W = decltype(width)::value;
    opmath_t sum[W] = {};
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * C + c0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) sum[j] += static_cast<opmath_t>(row[j]);
    }
    opmath_t shift[W], s1[W] = {}, s2[W] = {};
    for (int64_t j = 0; j < W; ++j) shift[j] = static_cast<opmath_t>(static_cast<double>(sum[j]) / n);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * C + c0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        const opmath_t d = static_cast<opmath_t>(row[j]) - shift[j];
        s1[j] += d;
        s2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < W; ++j) {
      out[c0 + j] = moments_from_deviations(n, static_cast<double>(shift[j]) + s1[j] / n, s1[j], s2[j]);
    }
  });
}

}  // namespace

void batch_moments(const at::Tensor& input, Layout layout, at::Tensor& mean, at::Tensor& m2) {
  std::vector<Stats> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedbn_batch_moments", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    stats = reduce_per_channel<Stats>(
        layout, Stats{0, 0, 0},
        [&](const SpanItem& it) { return span_item_moments(x, layout, it); },
        [&](int64_t r0, int64_t r1, Stats* out) { row_item_moments(x, layout, r0, r1, out); },
        [](const Stats& a, const Stats& b) { return chan_merge(a, b); });
  });
  std::vector<double> means(layout.channels), m2s(layout.channels);
  for (int64_t c = 0; c < layout.channels; ++c) {
    means[c] = stats[c].mean;
    m2s[c] = stats[c].m2;
  }
  store_channel_vector(mean, means);
  store_channel_vector(m2, m2s);
}

}  // namespace fusedbn::cpu
