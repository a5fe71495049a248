// The moments of one planar work item (two passes over a few KiB resident in L1), shared by the batch-moments
// kernel and the channel-at-a-time training forward.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "../../common/welford.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {

using Stats = Moments<double>;

// Moments of n values from the sums of their deviations d = x − shift: mean = shift + Σd/n and
// M2 = Σd² − (Σd)²/n (exact for any shift). In floating point the subtraction cancels the bits that (Σd)²/n
// shares with Σd², which are few when the shift is within a few standard deviations of the mean:
// Σd² = M2 + n·(mean − shift)², so a shift k standard deviations away cancels log2(1 + k²) bits.
inline Stats moments_from_deviations(double n, double shift, double sum_d, double sum_d2) {
  return {n, shift + sum_d / n, std::max(0.0, sum_d2 - sum_d * sum_d / n)};
}

// Whether the shift was too far from the mean for moments_from_deviations: more than 4 bits cancelled
// (M2 < Σd²/16, a shift more than √15 ≈ 3.9 standard deviations away), or Σd² not finite, which a distant shift
// can cause where the squared deviations from the mean still fit (values near ±1e19 in float32); for data with
// NaN or Inf, the second pass gives NaN or Inf again. Written as comparisons only (Σd² ≥ 0, and M2 from
// moments_from_deviations is never NaN), so that a loop over channels vectorises.
inline bool shift_too_far(double sum_d2, double m2) {
  return !(sum_d2 <= std::numeric_limits<double>::max() && m2 * 16.0 >= sum_d2);
}

// One pass over a planar item with the item's first value as the shift: a sample of the data, so usually within
// a few standard deviations of the mean. Where it was not (an outlier first), a second pass around the mean
// found by the first (L1-resident by then) gives the accuracy of a two-pass reduction. prefetch (of x) and
// next_offset as for sums_over_spans.
template <typename scalar_t>
Stats span_item_moments(const scalar_t* x, const Layout& l, const SpanItem& it, const StreamPrefetch& prefetch,
                        int64_t next_offset = -1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t len = it.inner_end - it.inner_begin;
  const auto offset = [l, it](int64_t o) { return span_offset(l, o, it.channel, it.inner_begin); };
  const double n = static_cast<double>((it.outer_end - it.outer_begin) * len);
  const auto around = [&](opmath_t shift) {
    const auto deviations = [x, shift](int64_t i) {
      const opmath_t d = subtract_on_fma_unit(to_opmath(x[i]), shift);
      return std::pair<opmath_t, opmath_t>(d, d * d);
    };
    const auto [sum_d, sum_d2] =
        sums_over_spans<opmath_t>(it.outer_begin, it.outer_end, len, offset, deviations, prefetch, next_offset);
    return std::pair(moments_from_deviations(n, static_cast<double>(shift), sum_d, sum_d2), sum_d2);
  };
  const auto [first, sum_d2] = around(to_opmath(x[offset(it.outer_begin)]));
  return shift_too_far(sum_d2, first.m2) ? around(static_cast<opmath_t>(first.mean)).first : first;
}

}  // namespace fusedbn::cpu
