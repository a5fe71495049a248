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
  const auto offset = [l, it](int64_t o) { return span_offset(l, o, it.channel, it.inner_begin); };
  const double sum = sums_over_spans<opmath_t>(it.outer_begin, it.outer_end, len, offset,
                                               [x](int64_t i) { return to_opmath(x[i]); });
  const double n = static_cast<double>((it.outer_end - it.outer_begin) * len);
  const opmath_t shift = static_cast<opmath_t>(sum / n);
  const auto [sum_d, sum_d2] = sums_over_spans<opmath_t>(it.outer_begin, it.outer_end, len, offset, [x, shift](int64_t i) {
    const opmath_t d = to_opmath(x[i]) - shift;
    return std::pair<opmath_t, opmath_t>(d, d * d);
  });
  return moments_from_deviations(n, static_cast<double>(shift) + sum_d / n, sum_d, sum_d2);
}

}  // namespace fusedbn::cpu
