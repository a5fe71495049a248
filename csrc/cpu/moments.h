// The moments of one planar work item (two passes over a few KiB resident in L1), shared by the batch-moments
// kernel and the channel-at-a-time training forward.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <utility>

#include "../common/welford.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {

using Stats = Moments<double>;

// Moments of n values from the sums of their deviations d = x − shift: mean = shift + Σd/n and
// M2 = Σd² − (Σd)²/n (exact for any shift; accurate because the shift is the item's own mean).
inline Stats moments_from_deviations(double n, double mean, double sum_d, double sum_d2) {
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
    sum += simd_sum<opmath_t>(len, [&](int64_t i) { return to_opmath(xs[i]); });
  }
  const double n = static_cast<double>((it.outer_end - it.outer_begin) * len);
  const opmath_t shift = static_cast<opmath_t>(static_cast<double>(sum) / n);
  double sum_d = 0, sum_d2 = 0;
  for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
    const scalar_t* xs = span(o);
    const auto [d1, d2] = simd_sum2<opmath_t>(len, [&](int64_t i) {
      const opmath_t d = to_opmath(xs[i]) - shift;
      return std::pair<opmath_t, opmath_t>(d, d * d);
    });
    sum_d += d1;
    sum_d2 += d2;
  }
  return moments_from_deviations(n, static_cast<double>(shift) + sum_d / n, sum_d, sum_d2);
}

}  // namespace fusedbn::cpu
