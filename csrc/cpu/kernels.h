// The CPU backend's kernels (see Backend in ../common/kernel_args.h for what each computes).
#pragma once

#include "../common/kernel_args.h"

namespace fusedbn::cpu {
#include "../common/backend_kernels.inc"
}  // namespace fusedbn::cpu
