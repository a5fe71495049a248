"""Builds fusedbn._C: the CPU kernels always, the CUDA kernels when asked (FORCE_CUDA=1) or when a CUDA
build of torch sees a GPU and a CUDA toolkit is present.

Build against the torch you run with: pip install --no-build-isolation .
Environment: FORCE_CUDA=1, CUDA_HOME, TORCH_CUDA_ARCH_LIST, FUSEDBN_CPU_FLAGS (default -march=native on
x86-64; set it to "" for a portable build).
"""

import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


# The torch releases fusedbn is built and tested with (.ci/run: 2.13 and 2.14; the GPU machine: 2.11).
SUPPORTED_TORCH = ((2, 11), (2, 14))


def check_torch() -> None:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    (oldest, newest) = SUPPORTED_TORCH
    if not oldest <= version <= newest:
        raise RuntimeError(f"fusedbn supports torch {oldest[0]}.{oldest[1]} to {newest[0]}.{newest[1]}; this is "
                           f"torch {torch.__version__}. Install a torch in that range (e.g. pip install "
                           f"torch==2.13.0), then build with --no-build-isolation")


def build_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


# nvcc's flags, beside those torch adds (.ci/nvcc_check.py compiles with the same). C++20 is named explicitly:
# torch before 2.13 would otherwise compile extensions as C++17.
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-DWITH_CUDA"]


def cpu_flags() -> list:
    if "FUSEDBN_CPU_FLAGS" in os.environ:
        return os.environ["FUSEDBN_CPU_FLAGS"].split()
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []


def extension():
    # csrc/library.cpp, then each op family's folder: its schemas and device-independent code, its cpu/ and
    # autograd/ registrations, and with CUDA its cuda/ kernels.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp") + glob.glob("csrc/*/cpu/*.cpp")
                     + glob.glob("csrc/*/autograd/*.cpp"))
    # -fno-trapping-math lets the compiler turn comparisons into vector selects (activations, clamps); no
    # result changes: fusedbn never relies on floating-point exception flags. -ffp-contract=off: gcc emits
    # several versions of a loop (vector body, scalar peel and tail, alias-checked fallbacks) and contracted
    # a·b + c into FMA in some but not others, so which version ran (thread context, row offsets) changed the
    # last bit; without contraction every version rounds alike and results are bitwise reproducible.
    # -std=c++20: see NVCC_FLAGS.
    cxx = ["-std=c++20", "-O3", "-g0", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
           "-ffp-contract=off"] + cpu_flags()
    if not build_cuda():
        return CppExtension("fusedbn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/*/cuda/*.cpp") + glob.glob("csrc/*/cuda/*.cu"))
    return CUDAExtension(
        "fusedbn._C",
        sources,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
        extra_link_args=["-fopenmp"],
    )


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__; .ci/nvcc_check.py imports it
    check_torch()
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
