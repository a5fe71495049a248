// The forward elementwise pass: y = act((x − mean)·scale + shift [+ residual]), one read of x (and residual),
// one write of y. For float32 and float64 inputs (x − mean)·scale rather than x·scale + (shift − mean·scale):
// the latter loses about 0.06 at |x| ≈ 1e4 in float32. For float16/bfloat16 inputs, whose loops are bound by
// instructions rather than memory, it is one fused multiply-add, fma(x, scale, shift − mean·scale): its error,
// about 2^-24·|mean|·scale, matters only where |mean|/σ > 2^15, and a 16-bit input stopped resolving its own
// deviations from the mean long before (|mean|/σ > 2^8 for bfloat16, 2^11 for float16).
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>

#include "../common/kernel_args.h"
#include "channel_coefs.h"
#include "work_items.h"

namespace fusedbn::cpu {

template <typename scalar_t, Activation A, bool kResidual>
struct Normalizer {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  scalar_t* __restrict__ y;
  opmath_t slope;

  Normalizer(const NormInputs& in, at::Tensor& output)
      : x(in.input.const_data_ptr<scalar_t>()),
        z(kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr),
        y(output.mutable_data_ptr<scalar_t>()),
        slope(static_cast<opmath_t>(in.negative_slope)) {}

  static constexpr bool kFusedMultiplyAdd = sizeof(scalar_t) == 2;

  opmath_t value(int64_t i, opmath_t mean, opmath_t scale, opmath_t shift) const {
    if constexpr (kFusedMultiplyAdd) {
      return value_fma(i, scale, fma_offset(mean, scale, shift));
    } else {
      return finish(i, (to_opmath(x[i]) - mean) * scale + shift);
    }
  }

  // The 16-bit form: pre-activation fma(x, scale, offset) with offset = fma_offset(mean, scale, shift).
  static opmath_t fma_offset(opmath_t mean, opmath_t scale, opmath_t shift) { return shift - mean * scale; }
  opmath_t value_fma(int64_t i, opmath_t scale, opmath_t offset) const {
    return finish(i, std::fma(to_opmath(x[i]), scale, offset));
  }

  opmath_t finish(int64_t i, opmath_t pre) const {
    if constexpr (kResidual) pre += to_opmath(z[i]);
    return activate<A>(pre, slope);
  }

  // The output of element begin + j as a function of j, for one channel's coefficients.
  auto channel_fn(int64_t begin, opmath_t mean, opmath_t scale, opmath_t shift) const {
    return [*this, begin, mean, scale, shift](int64_t j) { return value(begin + j, mean, scale, shift); };
  }

  // The spans of one planar work item, all of channel it.channel (C·inner elements apart).
  void span_item(const Layout& l, const SpanItem& it, opmath_t mean, opmath_t scale, opmath_t shift) const {
    const int64_t len = it.inner_end - it.inner_begin;
    for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
      const int64_t begin = span_offset(l, o, it.channel, it.inner_begin);
      store_converted_blocks(y + begin, 1, len, [&](int64_t) { return channel_fn(begin, mean, scale, shift); });
    }
  }

  // The contiguous spans of a run of channels, with per-channel coefficients.
  void span_run(const Layout& l, const SpanRun& run, const opmath_t* mean, const opmath_t* scale,
                const opmath_t* shift) const {
    const int64_t len = run.inner_end - run.inner_begin;
    const int64_t begin = span_offset(l, run.outer, run.channel_begin, run.inner_begin);
    store_converted_blocks(y + begin, run.channel_end - run.channel_begin, len, [&](int64_t b) {
      const int64_t c = run.channel_begin + b;
      return channel_fn(begin + b * len, mean[c], scale[c], shift[c]);
    });
  }
};

}  // namespace fusedbn::cpu
