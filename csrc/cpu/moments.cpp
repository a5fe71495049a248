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

#include "moments.h"
#include "simd.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

// One pass over a block of rows per kChannelBlock channels, each channel shifted by its value in the first row; the
// block is reduced again around the means so found where a shift was too far from its channel's mean (see
// span_item_moments).
template <typename scalar_t>
void row_item_moments(const scalar_t* x, const Layout& l, int64_t row_begin, int64_t row_end, Stats* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = l.channels;
  const double n = static_cast<double>(row_end - row_begin);
  for_channel_blocks(C, [&](int64_t c0, auto width) {
    constexpr int64_t W = decltype(width)::value;
    // Writes the block's moments around `shift`; returns whether a shift was too far from its channel's mean.
    const auto moments_around = [&](const opmath_t* shift_in) {
      opmath_t shift[W], s1[W] = {}, s2[W] = {};
      for (int64_t j = 0; j < W; ++j) shift[j] = shift_in[j];
      for (int64_t r = row_begin; r < row_end; ++r) {
        const scalar_t* row = x + r * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const opmath_t d = to_opmath(row[j]) - shift[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
      bool too_far = false;
      for (int64_t j = 0; j < W; ++j) {
        out[c0 + j] = moments_from_deviations(n, static_cast<double>(shift[j]), s1[j], s2[j]);
        too_far = too_far || shift_too_far(s2[j], out[c0 + j].m2);
      }
      return too_far;
    };
    opmath_t shift[W];
    for (int64_t j = 0; j < W; ++j) shift[j] = to_opmath(x[row_begin * C + c0 + j]);
    if (!moments_around(shift)) return;
    for (int64_t j = 0; j < W; ++j) shift[j] = static_cast<opmath_t>(out[c0 + j].mean);
    moments_around(shift);
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
