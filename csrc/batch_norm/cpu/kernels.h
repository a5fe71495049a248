// The CPU backend's kernels (see Backend in ../kernel_args.h for what each computes).
#pragma once

#include "../kernel_args.h"

namespace fusedbn::cpu {
#include "../backend_kernels.inc"

bool forward_train_by_channel(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                              double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                              at::Tensor& output);
bool backward_by_channel(const NormInputs& in, const at::Tensor& grad_output, GradSums& sums,
                         std::optional<double> count, at::Tensor& grad_input, at::Tensor& grad_residual);
}  // namespace fusedbn::cpu
