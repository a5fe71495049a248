// The CUDA backend's kernels (see Backend in ../common/kernel_args.h for what each computes). Host functions
// defined in the .cu files of this folder; they set the device guard and launch on the current stream.
#pragma once

#include "../common/kernel_args.h"

namespace fusedbn::cuda {
#include "../common/backend_kernels.inc"
}  // namespace fusedbn::cuda
