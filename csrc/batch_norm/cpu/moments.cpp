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

// One pass over a block of rows in memory order, each channel shifted by its value in the first row. Four rows at
// a time are added first, (d0 + d1) + (d2 + d3) and fma(d0, d0, d1²) + fma(d2, d2, d3²), to per-channel sums in L1
// (RowSums): the rows stream contiguously, and the four-row sums spread the additions to the arrays over four times
// the values. The block is reduced again around the means so found where a shift was too far from its channel's
// mean (see span_item_moments).
template <typename scalar_t>
void row_item_moments(const scalar_t* x, const Layout& l, int64_t row_begin, int64_t row_end, Stats* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const double n = static_cast<double>(row_end - row_begin);
  const bool prefetch = prefetches_rows(l.numel() * static_cast<int64_t>(sizeof(scalar_t)));
  std::vector<opmath_t> shifts(C);
  RowSums<opmath_t> sums(C);
  // Writes the block's moments around `shifts`; returns whether a shift was too far from its channel's mean.
  const auto moments_around = [&] {
    sums.reset();
    const opmath_t* __restrict__ shift = shifts.data();
    opmath_t* __restrict__ s1 = sums.first();
    opmath_t* __restrict__ s2 = sums.second();
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4) {
      if (prefetch) prefetch_rows_ahead(x, r * C, 4 * C, row_end * C);
      const scalar_t* r0 = x + r * C;
      const scalar_t* r1 = r0 + C;
      const scalar_t* r2 = r1 + C;
      const scalar_t* r3 = r2 + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t s = shift[c];
        const opmath_t d0 = subtract_on_fma_unit(to_opmath(r0[c]), s), d1 = subtract_on_fma_unit(to_opmath(r1[c]), s);
        const opmath_t d2 = subtract_on_fma_unit(to_opmath(r2[c]), s), d3 = subtract_on_fma_unit(to_opmath(r3[c]), s);
        s1[c] += (d0 + d1) + (d2 + d3);
        s2[c] += std::fma(d0, d0, d1 * d1) + std::fma(d2, d2, d3 * d3);
      }
      sums.end_group();
    }
    for (; r < row_end; ++r) {
      const scalar_t* row = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t d = subtract_on_fma_unit(to_opmath(row[c]), shift[c]);
        s1[c] += d;
        s2[c] += d * d;
      }
    }
    const double* __restrict__ total = sums.totals();
    int too_far = 0;
#pragma omp simd reduction(| : too_far)
    for (int64_t c = 0; c < C; ++c) {
      out[c] = moments_from_deviations(n, static_cast<double>(shift[c]), total[c], total[C + c]);
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
