// The fusedbn operators: declared once (ops.cpp) with the dispatcher, implemented once on top of a
// per-device Backend of kernels (cpu/, cuda/).
#pragma once

#include <torch/library.h>

#include "kernel_args.h"

namespace fusedbn {

// Called by each backend at load time; ops look their backend up by the input's device type.
void register_backend(c10::DeviceType device, const Backend* backend);

// Registers every op's implementation in a TORCH_LIBRARY_IMPL block of a backend's dispatch key.
void impl_all_ops(torch::Library& m);

}  // namespace fusedbn
