// Registers the CUDA kernels as the CUDA backend of every fusedbn op (built only with WITH_CUDA).
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace fusedbn::cuda {
namespace {

const Backend kCudaBackend{batch_moments,   batch_norm_stats, fixed_norm_stats,     normalize,
                           backward_reduce, backward_elemt,   update_running_stats, forward_train_fused,
                           nullptr};

const bool kRegistered = (register_backend(c10::DeviceType::CUDA, &kCudaBackend), true);

}  // namespace
}  // namespace fusedbn::cuda

TORCH_LIBRARY_IMPL(fusedbn, CUDA, m) {
  fusedbn::impl_all_ops(m);
}
