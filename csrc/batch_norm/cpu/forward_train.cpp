// The training forward one channel at a time, for large NCHW tensors whose channels fit in L2: the channel's moments,
// its normalisation statistics, then its normalisation while the data is still in cache — x comes from memory
// once instead of twice. Every value equals the separate kernels' (same work items, same merge order, same
// roundings), so which path runs never changes a result.
#include "kernels.h"

#include "moments.h"
#include "normalize.h"

namespace fusedbn::cpu {
namespace {

template <typename scalar_t, Activation A, bool kResidual>
void forward_train_typed(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                         double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                         at::Tensor& output) {
  using opmath_t = at::opmath_type<scalar_t>;
  using stats_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const Layout l = in.layout;
  const int64_t C = l.channels;
  const PlanarItems items(l);
  const scalar_t* x = in.input.const_data_ptr<scalar_t>();
  const Normalizer<scalar_t, A, kResidual> norm(in, output);
  const auto weight = channel_vector<double>(in.weight, C, 1.0);
  const auto shift = channel_vector<opmath_t>(in.bias, C, 0);
  const bool blend = prior_count > 0;
  const auto pm = channel_vector<double>(blend ? prior_mean : at::Tensor(), C, 0.0);
  const auto pv = channel_vector<double>(blend ? prior_var : at::Tensor(), C, 0.0);
  stats_t* bm = batch_mean.mutable_data_ptr<stats_t>();
  stats_t* bm2 = batch_m2.mutable_data_ptr<stats_t>();
  stats_t* mean = in.mean.mutable_data_ptr<stats_t>();
  stats_t* invstd = in.invstd.mutable_data_ptr<stats_t>();
  const double count = static_cast<double>(l.count_per_channel());
  const StreamPrefetch prefetch(l, x);
  at::parallel_for(0, C, channel_grain(l), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments<double> s{0, 0, 0};
      for (int64_t k = 0; k < items.per_channel; ++k) {
        s = chan_merge(s, span_item_moments(x, l, items.item(c, k), prefetch, items.next_item_offset(c, k)));
      }
      bm[c] = static_cast<stats_t>(s.mean);
      bm2[c] = static_cast<stats_t>(s.m2);
      const NormStats stats = norm_stats(count, static_cast<double>(bm[c]), static_cast<double>(bm2[c]), pm[c], pv[c],
                                         prior_count, eps);
      mean[c] = static_cast<stats_t>(stats.mean);
      invstd[c] = static_cast<stats_t>(stats.invstd);
      const opmath_t scale = static_cast<opmath_t>(static_cast<double>(invstd[c]) * weight[c]);
      for (int64_t k = 0; k < items.per_channel; ++k) {
        norm.span_item(l, items.item(c, k), static_cast<opmath_t>(mean[c]), scale, shift[c]);
      }
    }
  });
}

}  // namespace

bool forward_train_by_channel(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                              double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                              at::Tensor& output) {
  if (!channel_at_a_time(in.layout, static_cast<int64_t>(in.input.element_size()), 1)) return false;
  dispatch_norm_kernel(in, [&]<typename scalar_t, Activation A, bool kResidual>() {
    forward_train_typed<scalar_t, A, kResidual>(in, prior_mean, prior_var, prior_count, eps, batch_mean, batch_m2,
                                                output);
  });
  return true;
}

}  // namespace fusedbn::cpu
