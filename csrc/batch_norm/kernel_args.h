// What the op layer hands to a backend's kernels: tensors already checked, made dense in the layout
// below, and allocated. Shared by the CPU and CUDA backends (lean headers only, so nvcc can include it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <optional>

#include "../common/activation.h"

namespace fusedbn {

// Every 4-D input is processed as a dense [outer, channels, inner] array:
//   NCHW:          outer = N,         inner = H·W
//   channels_last: outer = N·H·W,     inner = 1   (channels are the fastest dimension)
struct Layout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  C10_HOST_DEVICE int64_t count_per_channel() const { return outer * inner; }
  C10_HOST_DEVICE int64_t numel() const { return outer * channels * inner; }
};

// The per-element inputs of normalisation and its gradient. residual, weight and bias may be undefined.
// mean and invstd are per-channel, in the statistics dtype (double for double input, float otherwise).
struct NormInputs {
  const at::Tensor& input;
  const at::Tensor& residual;
  const at::Tensor& mean;
  const at::Tensor& invstd;
  const at::Tensor& weight;
  const at::Tensor& bias;
  Layout layout;
  Activation activation;
  double negative_slope;
};

// The per-channel reductions of the backward pass, over the activation-masked gradient
// g = dy·act'(pre): sum_dy = Σg, sum_dy_xmu = Σg·(x − mean). Where grad_weight is defined, the reduction
// also writes the weight's gradient into it: sum_dy_xmu·invstd, rounded as the product of the two stored
// per-channel values.
struct GradSums {
  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
  at::Tensor grad_weight;
};

// The weight's gradient Σg·x̂ = Σg·(x − mean)·invstd of one channel, from its two stored per-channel values.
template <typename T>
C10_HOST_DEVICE inline T weight_gradient(T sum_dy_xmu, T invstd) {
  return sum_dy_xmu * invstd;
}

// The kernels one device provides. Outputs are preallocated by the caller.
struct Backend {
  // mean and M2 = Σ(x − mean)² of each channel.
  void (*batch_moments)(const at::Tensor& input, Layout layout, at::Tensor& mean, at::Tensor& m2);
  // mean and invstd = 1/sqrt(var + eps) from the batch moments of `count` values per channel, blended with
  // prior_count pseudo-samples at (prior_mean, prior_var) when prior_count > 0.
  void (*batch_norm_stats)(const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                           const at::Tensor& prior_mean, const at::Tensor& prior_var, double prior_count,
                           double eps, at::Tensor& mean, at::Tensor& invstd);
  // mean (copied) and invstd from given statistics, as in eval mode.
  void (*fixed_norm_stats)(const at::Tensor& mean_in, const at::Tensor& var_in, double eps, at::Tensor& mean,
                           at::Tensor& invstd);
  // output = act((x − mean)·invstd·weight + bias [+ residual]).
  void (*normalize)(const NormInputs& in, at::Tensor& output);
  void (*backward_reduce)(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums);
  // grad_input = w·invstd·(g − sum_dy/count − (x − mean)·invstd²·sum_dy_xmu/count); the sums are undefined
  // when the statistics are constants (eval mode), which leaves w·invstd·g. grad_residual (if defined) = g.
  void (*backward_elemt)(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums,
                         double count, at::Tensor& grad_input, at::Tensor& grad_residual);
  // If every batch mean and M2 is finite: num_batches_tracked += 1 (if defined), then running statistics
  // move towards (batch_mean, batch_m2/(count − 1)) by `momentum` (any finite number, as nn allows), or by
  // 1/num_batches_tracked when momentum is NaN (cumulative average: momentum=None). Writes whether it updated into the bool scalar `updated`.
  void (*update_running_stats)(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                               const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                               double momentum, at::Tensor& updated);
  // Optional (may be null): batch_moments + batch_norm_stats + normalize in one go where the backend can keep
  // data in cache, writing in.mean and in.invstd too; returns false (having written nothing) where it does
  // not apply. Results must equal the separate kernels'.
  bool (*forward_train_fused)(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                              double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                              at::Tensor& output);
  // Optional (may be null): backward_reduce + backward_elemt in one go (count = None: statistics are constants),
  // under the same contract as forward_train_fused.
  bool (*backward_fused)(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums,
                         std::optional<double> count, at::Tensor& grad_input, at::Tensor& grad_residual);
};

}  // namespace fusedbn
