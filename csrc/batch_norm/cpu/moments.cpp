// Per-channel batch moments (mean, M2) in one pass over memory: the deviations of each work item from a
// provisional mean (the shift: the item's first value) are summed, and the items are merged with Chan's formula
// in double. Never E[x²] − E[x]².
//
// Precision: the shift only needs to be close to the item's mean. mean = shift + Σd/n and
// M2 = Σd² − (Σd)²/n are exact for any shift, and with d small the float sums of d are accurate, so the mean
// ends within about one float32 ulp (tests/test_stability.py) without summing x itself in double. An item whose
// first value lies far from its mean is summed a second time, around the mean (see moments.h).
#include "kernels.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "moments.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

// One pass over a block of rows, each channel shifted by its value in the first row, in strips of channels
// (sums_by_strips). The block is reduced again around the means so found where a shift was too far from its
// channel's mean (see span_item_moments).
template <typename scalar_t>
void row_item_moments(const scalar_t* x, const Layout& l, int64_t row_begin, int64_t row_end,
                      const StreamPrefetch& prefetch, Stats* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const double n = static_cast<double>(row_end - row_begin);
  std::vector<opmath_t> shifts(C);
  // Writes the block's moments around `shifts`; returns whether a shift was too far from its channel's mean.
  const auto moments_around = [&] {
    // Σd and Σd², in strips of 8 vectors of each sum (24 registers with the shifts).
    const opmath_t* shift = shifts.data();
    const auto total = sums_by_strips<8, opmath_t>(
        C, row_begin, row_end,
        [x, shift](int64_t i, int64_t c) {
          const opmath_t d = subtract_on_fma_unit(to_opmath(x[i]), shift[c]);
          return std::pair<opmath_t, opmath_t>(d, d);
        },
        prefetch);
    int too_far = 0;
#pragma omp simd reduction(| : too_far)
    for (int64_t c = 0; c < C; ++c) {
      out[c] = moments_from_deviations(n, static_cast<double>(shifts[c]), total[c], total[C + c]);
      too_far |= shift_too_far(total[C + c], out[c].m2);
    }
    return too_far != 0;
  };
  for (int64_t c = 0; c < C; ++c) shifts[c] = to_opmath(x[row_begin * C + c]);
  if (!moments_around()) return;
  for (int64_t c = 0; c < C; ++c) shifts[c] = static_cast<opmath_t>(out[c].mean);
  moments_around();
}

}  // namespace

void batch_moments(const at::Tensor& input, Layout layout, at::Tensor& mean, at::Tensor& m2) {
  std::vector<Stats> stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fusedbn_batch_moments", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const StreamPrefetch prefetch(layout, x);
    stats = reduce_per_channel<Stats>(
        layout, Stats{0, 0, 0},
        [&](const SpanItem& it) { return span_item_moments(x, layout, it, prefetch); },
        [&](int64_t r0, int64_t r1, Stats* out) { row_item_moments(x, layout, r0, r1, prefetch, out); },
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
