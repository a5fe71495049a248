// The CUDA backend's kernels (see Backend in ../common/kernel_args.h for what each computes). Host functions
// defined in the .cu files of this folder; they set the device guard and launch on the current stream.
#pragma once

#include "../common/kernel_args.h"

namespace fusedbn::cuda {

void batch_moments(const at::Tensor& input, Layout layout, at::Tensor& mean, at::Tensor& m2);
void batch_norm_stats(const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                      const at::Tensor& prior_mean, const at::Tensor& prior_var, double prior_count, double eps,
                      at::Tensor& mean, at::Tensor& invstd);
void fixed_norm_stats(const at::Tensor& mean_in, const at::Tensor& var_in, double eps, at::Tensor& mean,
                      at::Tensor& invstd);
void normalize(const NormInputs& in, at::Tensor& output);
void backward_reduce(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums);
void backward_elemt(const NormInputs& in, const at::Tensor& grad_output, const GradSums& sums, double count,
                    at::Tensor& grad_input, at::Tensor& grad_residual);
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                          const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                          double momentum, at::Tensor& updated);

}  // namespace fusedbn::cuda
