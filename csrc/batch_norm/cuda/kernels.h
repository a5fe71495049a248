// The CUDA backend's kernels (see Backend in ../kernel_args.h for what each computes). Host functions
// defined in the .cu files of this folder; they set the device guard and launch on the current stream.
#pragma once

#include "../kernel_args.h"

namespace fusedbn::cuda {
#include "../backend_kernels.inc"

// batch_moments, batch_norm_stats and normalize with one kernel less: the merge of the moments also writes the
// normalisation statistics. Returns false (having written nothing) for an empty input.
bool forward_train_fused(const NormInputs& in, const at::Tensor& prior_mean, const at::Tensor& prior_var,
                         double prior_count, double eps, at::Tensor& batch_mean, at::Tensor& batch_m2,
                         at::Tensor& output);
}  // namespace fusedbn::cuda
