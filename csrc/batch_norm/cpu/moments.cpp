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
#include <vector>

#include "moments.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

// One pass over a block of rows in memory order, each channel shifted by its value in the first row. Four rows at
// a time are added first, (d0 + d1) + (d2 + d3), to per-channel sums in an L1-resident array: the rows stream
// contiguously, and the four-row sums spread the additions to the array over four times the values. The block is
// reduced again around the means so found where a shift was too far from its channel's mean (see
// span_item_moments).
template <typename scalar_t>
void row_item_moments(const scalar_t* x, const Layout& l, int64_t row_begin, int64_t row_end, Stats* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const double n = static_cast<double>(row_end - row_begin);
  std::vector<opmath_t> buffer(3 * C);
  opmath_t* __restrict__ shift = buffer.data();
  opmath_t* __restrict__ s1 = shift + C;
  opmath_t* __restrict__ s2 = s1 + C;
  // Writes the block's moments around `shift`; returns whether a shift was too far from its channel's mean.
  const auto moments_around = [&] {
    std::fill(s1, s1 + 2 * C, opmath_t(0));
    int64_t r = row_begin;
    for (; r + 4 <= row_end; r += 4) {
      prefetch_rows_ahead(x, r * C, 4 * C, row_end * C);
      const scalar_t* r0 = x + r * C;
      const scalar_t* r1 = r0 + C;
      const scalar_t* r2 = r1 + C;
      const scalar_t* r3 = r2 + C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t d0 = to_opmath(r0[c]) - shift[c], d1 = to_opmath(r1[c]) - shift[c];
        const opmath_t d2 = to_opmath(r2[c]) - shift[c], d3 = to_opmath(r3[c]) - shift[c];
        s1[c] += (d0 + d1) + (d2 + d3);
        s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
      }
    }
    for (; r < row_end; ++r) {
      const scalar_t* row = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const opmath_t d = to_opmath(row[c]) - shift[c];
        s1[c] += d;
        s2[c] += d * d;
      }
    }
    bool too_far = false;
    for (int64_t c = 0; c < C; ++c) {
      out[c] = moments_from_deviations(n, static_cast<double>(shift[c]), s1[c], s2[c]);
      too_far = too_far || shift_too_far(s2[c], out[c].m2);
    }
    return too_far;
  };
  for (int64_t c = 0; c < C; ++c) shift[c] = to_opmath(x[row_begin * C + c]);
  if (!moments_around()) return;
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<opmath_t>(out[c].mean);
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
