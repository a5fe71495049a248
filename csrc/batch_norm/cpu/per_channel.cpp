// Per-channel (length-C) arithmetic on the CPU: normalisation statistics and running-statistics updates.
#include "kernels.h"

#include <cmath>

#include "../../common/welford.h"
#include "simd.h"

namespace fusedbn::cpu {

void batch_norm_stats(const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                      const at::Tensor& prior_mean, const at::Tensor& prior_var, double prior_count, double eps,
                      at::Tensor& mean, at::Tensor& invstd) {
  const int64_t C = batch_mean.size(0);
  const auto bm = channel_vector<double>(batch_mean, C, 0.0);
  const auto bm2 = channel_vector<double>(batch_m2, C, 0.0);
  const bool blend = prior_count > 0;
  const auto pm = channel_vector<double>(blend ? prior_mean : at::Tensor(), C, 0.0);
  const auto pv = channel_vector<double>(blend ? prior_var : at::Tensor(), C, 0.0);
  std::vector<double> out_mean(C), out_invstd(C);
  for (int64_t c = 0; c < C; ++c) {
    const NormStats s = norm_stats(static_cast<double>(count), bm[c], bm2[c], pm[c], pv[c], prior_count, eps);
    out_mean[c] = s.mean;
    out_invstd[c] = s.invstd;
  }
  store_channel_vector(mean, out_mean);
  store_channel_vector(invstd, out_invstd);
}

void fixed_norm_stats(const at::Tensor& mean_in, const at::Tensor& var_in, double eps, at::Tensor& mean,
                      at::Tensor& invstd) {
  const int64_t C = mean_in.size(0);
  const auto m = channel_vector<double>(mean_in, C, 0.0);
  auto v = channel_vector<double>(var_in, C, 0.0);
  for (auto& x : v) x = 1.0 / std::sqrt(x + eps);
  store_channel_vector(mean, m);
  store_channel_vector(invstd, v);
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                          const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                          double momentum, at::Tensor& updated) {
  const int64_t C = batch_mean.size(0);
  const auto bm = channel_vector<double>(batch_mean, C, 0.0);
  const auto bm2 = channel_vector<double>(batch_m2, C, 0.0);
  bool finite = true;
  for (int64_t c = 0; c < C; ++c) finite = finite && std::isfinite(bm[c]) && std::isfinite(bm2[c]);
  *updated.mutable_data_ptr<bool>() = finite;
  if (!finite) return;
  double factor = momentum;
  if (num_batches_tracked.defined()) {
    int64_t& tracked = *num_batches_tracked.mutable_data_ptr<int64_t>();
    tracked += 1;
    if (std::isnan(momentum)) factor = 1.0 / static_cast<double>(tracked);
  }
  auto rm = channel_vector<double>(running_mean, C, 0.0);
  auto rv = channel_vector<double>(running_var, C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = moving_average(rm[c], bm[c], factor);
    rv[c] = moving_average(rv[c], bm2[c] / static_cast<double>(count - 1), factor);
  }
  store_channel_vector(running_mean, rm);
  store_channel_vector(running_var, rv);
}

}  // namespace fusedbn::cpu
