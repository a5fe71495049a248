// Backward passes. With pre = (x − mean)·scale + shift [+ z] recomputed from x (never stored) and the
// activation-masked gradient g = dy·act'(pre):
//   reduction:   sum_dy = Σg, sum_dy_xmu = Σg·(x − mean)                  (reads x, dy [, z])
//   elementwise: dx = g·scale − c1 − (x − mean)·c2, dz = g                (reads x, dy [, z]; writes dx [, dz])
// with scale = w·invstd, c1 = scale·sum_dy/n and c2 = scale·invstd²·sum_dy_xmu/n, the gradient of
// y = (x − mean)·invstd·w + b through the batch mean and variance of n values (c1 = c2 = 0 when the
// statistics are constants, as in eval mode).
#include "kernels.h"

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "blocked_stores.h"
#include "channel_coefs.h"
#include "prefetch.h"
#include "work_items.h"

namespace fusedbn::cpu {
namespace {

struct SumPair {
  double sum_dy, sum_dy_xmu;
};

// g = dy·act'(pre) at element i, given xmu = x[i] − mean and the channel's (scale, shift). A value type
// holding the data pointers, captured by copy, returning a scalar (a std::pair here stops gcc vectorising).
template <typename scalar_t, Activation A, bool kResidual>
struct MaskedGrad {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  opmath_t slope;

  MaskedGrad(const NormInputs& in, const at::Tensor& grad_output)
      : dy(grad_output.const_data_ptr<scalar_t>()),
        x(in.input.const_data_ptr<scalar_t>()),
        z(kResidual ? in.residual.const_data_ptr<scalar_t>() : nullptr),
        slope(static_cast<opmath_t>(in.negative_slope)) {}

  // Whether g depends on the residual (it does through the activation's derivative only).
  static constexpr bool reads_residual() { return kResidual && A != Activation::Identity; }

  // Prefetching of what g reads, in layout l.
  StreamPrefetch prefetch(const Layout& l) const { return StreamPrefetch(l, x, dy, reads_residual() ? z : nullptr); }

  opmath_t xmu(int64_t i, opmath_t mean) const { return subtract_on_fma_unit(to_opmath(x[i]), mean); }

  opmath_t operator()(int64_t i, opmath_t xmu, opmath_t scale, opmath_t shift) const {
    const opmath_t residual = reads_residual() ? to_opmath(z[i]) : opmath_t(0);
    return masked_grad<A, kResidual>(to_opmath(dy[i]), xmu, scale, shift, residual, slope);
  }
};

// (Σg, Σg·(x − mean)) over the spans of one planar work item; prefetch (grad.prefetch(l)) and next_offset as for
// sums_over_spans.
template <typename scalar_t, Activation A, bool kResidual, typename opmath_t = at::opmath_type<scalar_t>>
SumPair reduce_span_item(const MaskedGrad<scalar_t, A, kResidual>& grad, const Layout& l, const SpanItem& it,
                         opmath_t mean, opmath_t scale, opmath_t shift, const StreamPrefetch& prefetch,
                         int64_t next_offset = -1) {
  const auto [sum_dy, sum_dy_xmu] = sums_over_spans<opmath_t>(
      it.outer_begin, it.outer_end, it.inner_end - it.inner_begin,
      [l, it](int64_t o) { return span_offset(l, o, it.channel, it.inner_begin); },
      [grad, mean, scale, shift](int64_t i) {
        const opmath_t xmu = grad.xmu(i, mean);
        const opmath_t g = grad(i, xmu, scale, shift);
        return std::pair<opmath_t, opmath_t>(g, g * xmu);
      },
      prefetch, next_offset);
  return {sum_dy, sum_dy_xmu};
}

inline SumPair add(const SumPair& a, const SumPair& b) { return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu}; }

// dx = g·scale − c1 − (x − mean)·c2 and dz = g, element by element.
template <typename scalar_t, Activation A, bool kResidual>
struct GradWriter {
  using opmath_t = at::opmath_type<scalar_t>;
  // The op layer asks for dz exactly when a residual passes through a non-identity activation.
  static constexpr bool kWriteDz = kResidual && A != Activation::Identity;
  MaskedGrad<scalar_t, A, kResidual> grad;
  scalar_t* __restrict__ dx;
  scalar_t* __restrict__ dz;
  // With dx the only output and a cheap activation, dx is stored in blocks of vectors where it lies just above x, dy
  // (or z) modulo 4 KiB (blocked_stores.h).
  static constexpr bool kInBlocks = !kWriteDz && is_piecewise_polynomial(A);
  bool in_blocks;

  GradWriter(const NormInputs& in, const at::Tensor& grad_output, at::Tensor& grad_input, at::Tensor& grad_residual)
      : grad(in, grad_output),
        dx(grad_input.mutable_data_ptr<scalar_t>()),
        dz(kWriteDz ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr),
        in_blocks(kInBlocks && (stores_alias_loads(grad.x, dx) || stores_alias_loads(grad.dy, dx) ||
                                (kResidual && stores_alias_loads(grad.z, dx)))) {}

  static opmath_t dx_value(opmath_t g, opmath_t xmu, opmath_t scale, opmath_t c1, opmath_t c2) {
    return g * scale - c1 - xmu * c2;
  }

  void element(int64_t i, opmath_t mean, opmath_t scale, opmath_t shift, opmath_t c1, opmath_t c2) const {
    const opmath_t xmu = grad.xmu(i, mean);
    const opmath_t g = grad(i, xmu, scale, shift);
    dx[i] = from_opmath<scalar_t>(dx_value(g, xmu, scale, c1, c2));
    if constexpr (kWriteDz) dz[i] = from_opmath<scalar_t>(g);
  }

  // Elements [begin, begin + len), coefficients coef(j) = (mean, scale, shift, c1, c2) of element begin + j.
  template <typename Coefs>
  void elements(int64_t begin, int64_t len, const Coefs& coef) const {
    if constexpr (kInBlocks) {
      store_elements(
          dx + begin, len,
          [w = *this, begin, coef](int64_t j) {
            const auto [mean, scale, shift, c1, c2] = coef(j);
            const opmath_t xmu = w.grad.xmu(begin + j, mean);
            return from_opmath<scalar_t>(dx_value(w.grad(begin + j, xmu, scale, shift), xmu, scale, c1, c2));
          },
          in_blocks);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const auto [mean, scale, shift, c1, c2] = coef(j);
        element(begin + j, mean, scale, shift, c1, c2);
      }
    }
  }

  void span(int64_t begin, int64_t len, opmath_t mean, opmath_t scale, opmath_t shift, opmath_t c1, opmath_t c2) const {
    elements(begin, len, [=](int64_t) { return std::tuple(mean, scale, shift, c1, c2); });
  }

  void span_item(const Layout& l, const SpanItem& it, opmath_t mean, opmath_t scale, opmath_t shift, opmath_t c1,
                 opmath_t c2) const {
    for (int64_t o = it.outer_begin; o < it.outer_end; ++o) {
      span(span_offset(l, o, it.channel, it.inner_begin), it.inner_end - it.inner_begin, mean, scale, shift, c1, c2);
    }
  }
};

// The correction terms of dx for one channel: c1 = scale·Σg/n, c2 = scale·invstd²·Σg·(x − mean)/n.
template <typename opmath_t>
std::pair<opmath_t, opmath_t> grad_corrections(double weight, double invstd, double sum_dy, double sum_dy_xmu,
                                               double count) {
  const double scale = weight * invstd;
  return {static_cast<opmath_t>(scale * sum_dy / count),
          static_cast<opmath_t>(scale * invstd * invstd * sum_dy_xmu / count)};
}

// grad_weight = sum_dy_xmu·invstd per channel where it is requested, from the stored values of both.
void store_grad_weight(const GradSums& sums, const at::Tensor& invstd) {
  if (!sums.grad_weight.defined()) return;
  AT_DISPATCH_FLOATING_TYPES(sums.grad_weight.scalar_type(), "fusedbn_grad_weight", [&] {
    const int64_t C = sums.grad_weight.size(0);
    const auto inv = channel_vector<scalar_t>(invstd, C, scalar_t(0));
    const scalar_t* s2 = sums.sum_dy_xmu.const_data_ptr<scalar_t>();
    scalar_t* gw = sums.grad_weight.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) gw[c] = weight_gradient(s2[c], inv[c]);
  });
}

template <typename scalar_t, Activation A, bool kResidual>
void backward_reduce_typed(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Layout l = in.layout;
  const NormCoefs<opmath_t> k(in);
  const MaskedGrad<scalar_t, A, kResidual> grad(in, grad_output);
  const StreamPrefetch prefetch = grad.prefetch(l);
  const auto result = reduce_per_channel<SumPair>(
      l, SumPair{0, 0},
      [&](const SpanItem& it) {
        return reduce_span_item(grad, l, it, k.mean[it.channel], k.scale[it.channel], k.shift[it.channel], prefetch);
      },
      // Rows in strips of channels (sums_by_strips): 4 vectors of each sum, with the mean, scale and shift of each
      // channel 20 registers.
      [&, grad](int64_t r0, int64_t r1, SumPair* out) {
        const opmath_t* __restrict__ mean = k.mean.data();
        const opmath_t* __restrict__ scale = k.scale.data();
        const opmath_t* __restrict__ shift = k.shift.data();
        const auto total = sums_by_strips<4, opmath_t>(
            l.channels, r0, r1,
            [=](int64_t i, int64_t c) {
              const opmath_t xmu = grad.xmu(i, mean[c]);
              return std::pair<opmath_t, opmath_t>(grad(i, xmu, scale[c], shift[c]), xmu);
            },
            prefetch);
        for (int64_t c = 0; c < l.channels; ++c) out[c] = {total[c], total[l.channels + c]};
      },
      [](const SumPair& a, const SumPair& b) { return add(a, b); });
  std::vector<double> s1(l.channels), s2(l.channels);
  for (int64_t c = 0; c < l.channels; ++c) {
    s1[c] = result[c].sum_dy;
    s2[c] = result[c].sum_dy_xmu;
  }
  store_channel_vector(sums.sum_dy, s1);
  store_channel_vector(sums.sum_dy_xmu, s2);
  store_grad_weight(sums, in.invstd);
}

template <typename scalar_t, Activation A, bool kResidual>
void backward_elemt_typed(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums, double count,
                          at::Tensor& grad_input, at::Tensor& grad_residual) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Layout l = in.layout;
  const int64_t C = l.channels;
  const NormCoefs<opmath_t> k(in);
  std::vector<opmath_t> c1(C, 0), c2(C, 0);
  if (sums.sum_dy.defined()) {
    const auto invstd = channel_vector<double>(in.invstd, C, 0.0);
    const auto weight = channel_vector<double>(in.weight, C, 1.0);
    const auto s1 = channel_vector<double>(sums.sum_dy, C, 0.0);
    const auto s2 = channel_vector<double>(sums.sum_dy_xmu, C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      std::tie(c1[c], c2[c]) = grad_corrections<opmath_t>(weight[c], invstd[c], s1[c], s2[c], count);
    }
  }
  const GradWriter<scalar_t, A, kResidual> writer(in, grad_output, grad_input, grad_residual);
  for_each_item(
      l,
      [&](const SpanRun& run) {
        for (int64_t c = run.channel_begin; c < run.channel_end; ++c) {
          writer.span(span_offset(l, run.outer, c, run.inner_begin), run.inner_end - run.inner_begin, k.mean[c],
                      k.scale[c], k.shift[c], c1[c], c2[c]);
        }
      },
      [&](int64_t r0, int64_t r1) {
        const opmath_t* __restrict__ mean = k.mean.data();
        const opmath_t* __restrict__ scale = k.scale.data();
        const opmath_t* __restrict__ shift = k.shift.data();
        const opmath_t* __restrict__ a = c1.data();
        const opmath_t* __restrict__ b = c2.data();
        for (int64_t r = r0; r < r1; ++r) {
          writer.elements(r * C, C, [=](int64_t c) { return std::tuple(mean[c], scale[c], shift[c], a[c], b[c]); });
        }
      });
}

// Reduction and elementwise pass one channel at a time (large NCHW tensors whose x and dy of one channel fit
// in L2): x and dy come from memory once. Values equal the separate kernels' (same items, order, roundings).
template <typename scalar_t, Activation A, bool kResidual>
void backward_by_channel_typed(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums,
                               std::optional<double> count, at::Tensor& grad_input, at::Tensor& grad_residual) {
  using opmath_t = at::opmath_type<scalar_t>;
  using stats_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Layout l = in.layout;
  const PlanarItems items(l);
  const NormCoefs<opmath_t> k(in);
  const auto invstd = channel_vector<double>(in.invstd, l.channels, 0.0);
  const auto weight = channel_vector<double>(in.weight, l.channels, 1.0);
  const GradWriter<scalar_t, A, kResidual> writer(in, grad_output, grad_input, grad_residual);
  const StreamPrefetch prefetch = writer.grad.prefetch(l);
  stats_t* s1 = sums.sum_dy.mutable_data_ptr<stats_t>();
  stats_t* s2 = sums.sum_dy_xmu.mutable_data_ptr<stats_t>();
  at::parallel_for(0, l.channels, channel_grain(l), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      SumPair acc{0, 0};
      for (int64_t i = 0; i < items.per_channel; ++i) {
        acc = add(acc, reduce_span_item(writer.grad, l, items.item(c, i), k.mean[c], k.scale[c], k.shift[c], prefetch,
                                        items.next_item_offset(c, i)));
      }
      s1[c] = static_cast<stats_t>(acc.sum_dy);
      s2[c] = static_cast<stats_t>(acc.sum_dy_xmu);
      opmath_t c1 = 0, c2 = 0;
      if (count.has_value()) {
        std::tie(c1, c2) = grad_corrections<opmath_t>(weight[c], invstd[c], static_cast<double>(s1[c]),
                                                      static_cast<double>(s2[c]), *count);
      }
      for (int64_t i = 0; i < items.per_channel; ++i) {
        writer.span_item(l, items.item(c, i), k.mean[c], k.scale[c], k.shift[c], c1, c2);
      }
    }
  });
  store_grad_weight(sums, in.invstd);
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

bool backward_by_channel(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums,
                         std::optional<double> count, at::Tensor& grad_input, at::Tensor& grad_residual) {
  if (!channel_at_a_time(in.layout, static_cast<int64_t>(in.input.element_size()), 2)) return false;
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    backward_by_channel_typed<scalar_t, A, kResidual>(in, grad_output, sums, count, grad_input, grad_residual);
  });
  return true;
}

}  // namespace fusedbn::cpu
