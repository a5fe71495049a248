// Per-channel (length-C) arithmetic on the GPU: normalisation statistics and the running-statistics update,
// so that no value travels to the host (no synchronisation).
#include <cmath>

#include "common.cuh"
#include "kernels.h"

namespace fusedbn::cuda {
namespace {

template <typename A, typename P>
__global__ void batch_norm_stats_kernel(const A* batch_mean, const A* batch_m2, double count, const P* prior_mean,
                                        const P* prior_var, double prior_count, double eps, int64_t channels,
                                        A* mean, A* invstd) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool blend = prior_count > 0;
    const NormStats s = norm_stats(count, static_cast<double>(batch_mean[c]), static_cast<double>(batch_m2[c]),
                                   blend ? static_cast<double>(prior_mean[c]) : 0.0,
                                   blend ? static_cast<double>(prior_var[c]) : 0.0, prior_count, eps);
    mean[c] = static_cast<A>(s.mean);
    invstd[c] = static_cast<A>(s.invstd);
  }
}

template <typename A, typename P>
__global__ void fixed_norm_stats_kernel(const P* mean_in, const P* var_in, double eps, int64_t channels, A* mean,
                                        A* invstd) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    mean[c] = static_cast<A>(mean_in[c]);
    invstd[c] = static_cast<A>(1.0 / ::sqrt(static_cast<double>(var_in[c]) + eps));
  }
}

// One block: all channels finite → num_batches_tracked += 1, running statistics move towards the batch's.
template <typename A, typename R>
__global__ void update_running_stats_kernel(R* running_mean, R* running_var, int64_t* num_batches_tracked,
                                            const A* batch_mean, const A* batch_m2, int64_t count, double momentum,
                                            int64_t channels, bool* updated) {
  int finite = 1;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    finite &= ::isfinite(static_cast<double>(batch_mean[c])) && ::isfinite(static_cast<double>(batch_m2[c]));
  }
  finite = __syncthreads_and(finite);
  if (threadIdx.x == 0) *updated = finite != 0;
  if (!finite) return;
  double factor = momentum;
  if (num_batches_tracked != nullptr) {
    const int64_t tracked = *num_batches_tracked + 1;
    if (::isnan(momentum)) factor = 1.0 / static_cast<double>(tracked);
    __syncthreads();  // every thread has read the old count
    if (threadIdx.x == 0) *num_batches_tracked = tracked;
  }
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    const double unbiased = static_cast<double>(batch_m2[c]) / static_cast<double>(count - 1);
    running_mean[c] = static_cast<R>(moving_average(static_cast<double>(running_mean[c]),
                                                    static_cast<double>(batch_mean[c]), factor));
    running_var[c] = static_cast<R>(moving_average(static_cast<double>(running_var[c]), unbiased, factor));
  }
}

int64_t channel_blocks(int64_t channels) { return std::max<int64_t>(1, (channels + kThreads - 1) / kThreads); }

}  // namespace

void batch_norm_stats(const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                      const at::Tensor& prior_mean, const at::Tensor& prior_var, double prior_count, double eps,
                      at::Tensor& mean, at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(batch_mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(batch_mean.get_device());
  const int64_t C = batch_mean.size(0);
  const bool blend = prior_count > 0;
  const at::Tensor pm = blend ? prior_mean.contiguous() : batch_mean;
  const at::Tensor pv = blend ? dense_as(prior_var, pm.scalar_type()) : batch_m2;
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "fusedbn_cuda_batch_norm_stats", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pm.scalar_type(), "fusedbn_cuda_prior", [&] {
      batch_norm_stats_kernel<A, scalar_t><<<channel_blocks(C), kThreads, 0, stream>>>(
          batch_mean.const_data_ptr<A>(), batch_m2.const_data_ptr<A>(), static_cast<double>(count),
          pm.const_data_ptr<scalar_t>(), pv.const_data_ptr<scalar_t>(), prior_count, eps, C,
          mean.mutable_data_ptr<A>(), invstd.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void fixed_norm_stats(const at::Tensor& mean_in, const at::Tensor& var_in, double eps, at::Tensor& mean,
                      at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(mean_in.get_device());
  const int64_t C = mean_in.size(0);
  const at::Tensor m = mean_in.contiguous(), v = dense_as(var_in, mean_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "fusedbn_cuda_fixed_norm_stats", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "fusedbn_cuda_fixed_in", [&] {
      fixed_norm_stats_kernel<A, scalar_t><<<channel_blocks(C), kThreads, 0, stream>>>(
          m.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), eps, C, mean.mutable_data_ptr<A>(),
          invstd.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                          const at::Tensor& batch_mean, const at::Tensor& batch_m2, int64_t count,
                          double momentum, at::Tensor& updated) {
  const c10::cuda::CUDAGuard guard(batch_mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(batch_mean.get_device());
  const int64_t C = batch_mean.size(0);
  // The kernel writes through raw pointers: work on dense copies if the buffers are strided views.
  at::Tensor rm = running_mean.is_contiguous() ? running_mean : running_mean.contiguous();
  at::Tensor rv = dense_as(running_var, rm.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "fusedbn_cuda_update_running_stats", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "fusedbn_cuda_running", [&] {
      update_running_stats_kernel<A, scalar_t><<<1, kThreads, 0, stream>>>(
          rm.mutable_data_ptr<scalar_t>(), rv.mutable_data_ptr<scalar_t>(),
          num_batches_tracked.defined() ? num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr,
          batch_mean.const_data_ptr<A>(), batch_m2.const_data_ptr<A>(), count, momentum, C,
          updated.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
}

}  // namespace fusedbn::cuda
