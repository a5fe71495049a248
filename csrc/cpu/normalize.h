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

  opmath_t value(int64_t i, opmath_t mean, opmath_t scale, opmath_t shift) const {
    opmath_t pre;
    if constexpr (sizeof(scalar_t) == 2) {
      pre = std::fma(to_opmath(x[i]), scale, shift - mean * scale);
    } else {
      pre = (to_opmath(x[i]) - mean) * scale + shift;
    }
    if constexpr (kResidual) pre += to_opmath(z[i]);
    return activate<A>(pre, slope);
  }

  // y[begin + j] for j in [0, n), with one channel's coefficients.
  void run(int64_t begin, int64_t n, opmath_t mean, opmath_t scale, opmath_t shift) const {
    store_converted(y + begin, n, [&](int64_t j) { return value(begin + j, mean, scale, shift); });
  }

  // The spans of one planar work item, all of channel it.channel.
  void span_item(const Layout& l, const SpanItem& it, opmath_t mean, opmath_t scale, opmath_t shift) const {
    const int64_t len = it.inner_end - it.inner_begin;
    for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
      run(span_offset(l, o, it.channel, it.inner_begin), len, mean, scale, shift);
    }
  }
};

}  // namespace fusedbn::cpu
