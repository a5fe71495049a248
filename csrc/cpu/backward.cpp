// Backward passes. With pre = (x − mean)·scale + shift [+ z] recomputed from x (never stored) and the
// activation-masked gradient g = dy·act'(pre):
//   reduction:   sum_dy = Σg, sum_dy_xmu = Σg·(x − mean)                  (reads x, dy [, z])
//   elementwise: dx = g·scale − c1 − (x − mean)·c2, dz = g                (reads x, dy [, z]; writes dx [, dz])
// with scale = w·invstd, c1 = scale·sum_dy/n and c2 = scale·invstd²·sum_dy_xmu/n, the gradient of
// y = (x − mean)·invstd·w + b through the batch mean and variance of n values (c1 = c2 = 0 when the
// statistics are constants, as in eval mode).
#include "kernels.h"

#include "channel_coefs.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

struct SumPair {
  double sum_dy, sum_dy_xmu;
};

// g = dy·act'(pre) at element i of channel coefficients (mean, scale, shift).
template <typename scalar_t, typename opmath_t, Activation A, bool kResidual>
struct MaskedGrad {
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  opmath_t slope;

  // Returns (g, x − mean).
  std::pair<opmath_t, opmath_t> operator()(int64_t i, opmath_t mean, opmath_t scale, opmath_t shift) const {
    const opmath_t xmu = static_cast<opmath_t>(x[i]) - mean;
    opmath_t g = static_cast<opmath_t>(dy[i]);
    if constexpr (A != Activation::Identity) {
      opmath_t pre = xmu * scale + shift;
      if constexpr (kResidual) pre += static_cast<opmath_t>(z[i]);
      g *= activation_grad<A>(pre, slope);
    }
    return {g, xmu};
  }
};

template <typename scalar_t, Activation A, bool kResidual>
MaskedGrad<scalar_t, at::opmath_type<scalar_t>, A, kResidual> masked_grad(const NormInputs& in,
                                                                           const at::Tensor& grad_output) {
  return {grad_output.const_data_ptr<scalar_t>(), in.input.const_data_ptr<scalar_t>(),
          kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr,
          static_cast<at::opmath_type<scalar_t>>(in.negative_slope)};
}

template <typename scalar_t, Activation A, bool kResidual>
void backward_reduce_typed(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Layout l = in.layout;
  const NormCoefs<opmath_t> k(in);
  const auto grad = masked_grad<scalar_t, A, kResidual>(in, grad_output);
  const auto result = reduce_per_channel<SumPair>(
      l, SumPair{0, 0},
      [&](const SpanItem& it) {
        const int64_t c = it.channel, len = it.inner_end - it.inner_begin;
        SumPair acc{0, 0};
        for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
          const int64_t off = span_offset(l, o, c, it.inner_begin);
          const auto [s1, s2] = lane_sum2<opmath_t>(len, [&](int64_t j) {
            const auto [g, xmu] = grad(off + j, k.mean[c], k.scale[c], k.shift[c]);
            return std::pair<opmath_t, opmath_t>(g, g * xmu);
          });
          acc.sum_dy += s1;
          acc.sum_dy_xmu += s2;
        }
        return acc;
      },
      [&](int64_t r0, int64_t r1, SumPair* out) {
        const int64_t C = l.channels;
        std::vector<opmath_t> s1(C, 0), s2(C, 0);
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = 0; c < C; ++c) {
            const auto [g, xmu] = grad(r * C + c, k.mean[c], k.scale[c], k.shift[c]);
            s1[c] += g;
            s2[c] += g * xmu;
          }
        }
        for (int64_t c = 0; c < C; ++c) out[c] = {static_cast<double>(s1[c]), static_cast<double>(s2[c])};
      },
      [](const SumPair& a, const SumPair& b) { return SumPair{a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu}; });
  std::vector<double> s1(l.channels), s2(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) {
    s1[c] = result[c].sum_dy;
    s2[c] = result[c].sum_dy_xmu;
  }
  store_channel_vector(sums.sum_dy, s1);
  store_channel_vector(sums.sum_dy_xmu, s2);
}

template <typename scalar_t, Activation A, bool kResidual>
void backward_elemt_typed(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums, double count,
                          at::Tensor& grad_input, at::Tensor& grad_residual) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Layout l = in.layout;
  const int64_t C = l.channels;
  const NormCoefs<opmath_t> k(in);
  const auto grad = masked_grad<scalar_t, A, kResidual>(in, grad_output);
  std::vector<opmath_t> c1(C, 0), c2(C, 0);
  if (sums.sum_dy.defined()) {
    const auto invstd = channel_vector<double>(in.invstd, C, 0.0);
    const auto weight = channel_vector<double>(in.weight, C, 1.0);
    const auto s1 = channel_vector<double>(sums.sum_dy, C, 0.0);
    const auto s2 = channel_vector<double>(sums.sum_dy_xmu, C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      const double scale = weight[c] * invstd[c];
      c1[c] = static_cast<opmath_t>(scale * s1[c] / count);
      c2[c] = static_cast<opmath_t>(scale * invstd[c] * invstd[c] * s2[c] / count);
    }
  }
  scalar_t* __restrict__ dx = grad_input.mutable_data_ptr<scalar_t>();
  // The op layer asks for dz exactly when a residual passes through a non-identity activation.
  constexpr bool kWriteDz = kResidual && A != Activation::Identity;
  scalar_t* __restrict__ dz = kWriteDz ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  auto element = [&](int64_t i, int64_t c) {
    const auto [g, xmu] = grad(i, k.mean[c], k.scale[c], k.shift[c]);
    dx[i] = static_cast<scalar_t>(g * k.scale[c] - c1[c] - xmu * c2[c]);
    if constexpr (kWriteDz) dz[i] = static_cast<scalar_t>(g);
  };
  for_each_item(
      l,
      [&](const SpanItem& it) {
        const int64_t len = it.inner_end - it.inner_begin;
        for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
          const int64_t off = span_offset(l, o, it.channel, it.inner_begin);
          for (int64_t j = off; j < off + len; ++j) element(j, it.channel);
        }
      },
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t c = 0; c < C; ++c) element(r * C + c, c);
        }
      });
}

}  // namespace

void backward_reduce(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums) {
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    backward_reduce_typed<scalar_t, A, kResidual>(in, grad_output, sums);
  });
}

void backward_elemt(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums, double count,
                    at::Tensor& grad_input, at::Tensor& grad_residual) {
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    backward_elemt_typed<scalar_t, A, kResidual>(in, grad_output, sums, count, grad_input, grad_residual);
  });
}

}  // namespace fusedbn::cpu
