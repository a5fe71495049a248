// Per-channel coefficients of the elementwise passes, read once per call in the kernels' math type.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "../kernel_args.h"
#include "simd.h"

namespace fusedbn::cpu {

// pre-activation = (x − mean)·scale + shift [+ residual], scale = invstd·weight, shift = bias.
template <typename opmath_t>
struct NormCoefs {
  std::vector<opmath_t> mean, scale, shift;
  opmath_t negative_slope;

  explicit NormCoefs(const NormInputs& in) {
    const int64_t C = in.layout.channels;
    mean = channel_vector<opmath_t>(in.mean, C, 0);
    const auto invstd = channel_vector<double>(in.invstd, C, 0.0);
    const auto weight = channel_vector<double>(in.weight, C, 1.0);
    scale.resize(C);
    for (int64_t c = 0; c < C; ++c) scale[c] = static_cast<opmath_t>(invstd[c] * weight[c]);
    shift = channel_vector<opmath_t>(in.bias, C, 0);
    negative_slope = static_cast<opmath_t>(in.negative_slope);
  }
};

// Calls f.template operator()<scalar_t, A, kResidual>() for the input's dtype, the activation and whether
// a residual is present: each combination is its own specialisation of the elementwise loops.
template <typename F>
void dispatch_norm_kernel(const NormInputs& in, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "fusedbn_kernel", [&] {
    dispatch_activation(in.activation, [&](auto act) {
      if (in.residual.defined()) {
        f.template operator()<scalar_t, decltype(act)::value, true>();
      } else {
        f.template operator()<scalar_t, decltype(act)::value, false>();
      }
    });
  });
}

}  // namespace fusedbn::cpu
