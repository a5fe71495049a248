// Registers the CPU kernels as the CPU backend of every fusedbn op.
#include <torch/library.h>

#include "../ops.h"
#include "kernels.h"

namespace fusedbn::cpu {
namespace {

const Backend kCpuBackend{batch_moments,   batch_norm_stats, fixed_norm_stats,     normalize,
                          backward_reduce, backward_elemt,   update_running_stats, forward_train_by_channel,
                          backward_by_channel};

const bool kRegistered = (register_backend(c10::DeviceType::CPU, &kCpuBackend), true);

}  // namespace
}  // namespace fusedbn::cpu

TORCH_LIBRARY_IMPL(fusedbn, CPU, m) {
  fusedbn::impl_all_ops(m);
}
