// Per-channel moments (count, mean, M2) and their merge, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fusedbn {

// M2 is the sum of squared deviations from the mean: Σ(x − mean)².
template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Chan, Golub and LeVeque (1979): merge the moments of two disjoint sets.
//   n = na + nb, δ = mean_b − mean_a, mean = mean_a + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> chan_merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t n = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = b.count / n;
  return {n, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// Welford (1962): add one value.
template <typename acc_t>
C10_HOST_DEVICE inline void welford_add(Moments<acc_t>& m, acc_t x) {
  m.count += acc_t(1);
  const acc_t delta = x - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (x - m.mean);
}

// The statistics that normalise a channel: the batch moments, optionally blended with `prior_count`
// pseudo-samples at (prior_mean, prior_var) — a Chan merge whose prior M2 is prior_count·prior_var.
// prior_count = 0 is ordinary batch norm. Returns the biased variance, clamped at 0.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> blend_with_prior(
    const Moments<acc_t>& batch, acc_t prior_mean, acc_t prior_var, acc_t prior_count) {
  const Moments<acc_t> prior{prior_count, prior_mean, prior_count * prior_var};
  Moments<acc_t> merged = chan_merge(batch, prior);
  if (merged.m2 < acc_t(0)) merged.m2 = acc_t(0);
  return merged;
}

// What normalises a channel in training: the mean and invstd = 1/sqrt(var + eps) of its batch moments (`count`
// values), blended with prior_count pseudo-samples at (prior_mean, prior_var) when prior_count > 0.
struct NormStats {
  double mean;
  double invstd;
};

C10_HOST_DEVICE inline NormStats norm_stats(double count, double batch_mean, double batch_m2, double prior_mean,
                                            double prior_var, double prior_count, double eps) {
  Moments<double> s{count, batch_mean, batch_m2};
  if (prior_count > 0) s = blend_with_prior(s, prior_mean, prior_var, prior_count);
  return {s.mean, 1.0 / ::sqrt(s.m2 / s.count + eps)};
}

// Exponential moving average as nn.BatchNorm2d computes it: (1 − f)·running + f·batch.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t moving_average(acc_t running, acc_t batch, acc_t factor) {
  return factor * batch + (acc_t(1) - factor) * running;
}

}  // namespace fusedbn
