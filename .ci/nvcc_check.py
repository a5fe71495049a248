"""Compiles every csrc/**/*.cu with nvcc (compile only, sm_90) against the installed torch's headers, with the
flags of the real build (setup.py's NVCC_FLAGS and the ones torch adds), and syntax-checks the host files of the
CUDA build (csrc/*/cuda/*.cpp) with the host compiler.

Keeps the CUDA sources from rotting on machines without a GPU or a CUDA build of torch: the .cu files include
only lean headers, so the CPU build of torch provides all they need (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE).
"""

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths


def build_nvcc_flags(root: str) -> list:
    """setup.py's NVCC_FLAGS (importing setup.py does not build: it calls setup() only as __main__)."""
    spec = importlib.util.spec_from_file_location("fusedbn_setup", os.path.join(root, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NVCC_FLAGS


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))
    if not sources:
        print("nvcc check: no .cu files")
        return 0
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    flags = ["-c", f"-arch={args.arch}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *COMMON_NVCC_FLAGS,
             *build_nvcc_flags(root), "-Xcompiler", "-fPIC"]
    failed = []
    with tempfile.TemporaryDirectory() as out:
        for src in sources:
            start = time.time()
            cmd = [args.nvcc, *flags, *includes, src, "-o", os.path.join(out, os.path.basename(src) + ".o")]
            result = subprocess.run(cmd, capture_output=True, text=True)
            rel = os.path.relpath(src, root)
            status = "ok" if result.returncode == 0 else "FAILED"
            print(f"nvcc {rel}: {status} ({time.time() - start:.0f} s)", flush=True)
            if result.returncode != 0:
                print(result.stdout + result.stderr)
                failed.append(rel)
        nvcc_path = os.path.realpath(shutil.which(args.nvcc) or args.nvcc)
        cuda_include = os.path.join(os.path.dirname(os.path.dirname(nvcc_path)), "include")
        for src in sorted(glob.glob(os.path.join(root, "csrc", "*", "cuda", "*.cpp"))):
            cmd = ["c++", "-fsyntax-only", "-std=c++20", "-DWITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                   f"-I{cuda_include}", *includes, src]
            result = subprocess.run(cmd, capture_output=True, text=True)
            rel = os.path.relpath(src, root)
            print(f"c++ -fsyntax-only {rel}: {'ok' if result.returncode == 0 else 'FAILED'}", flush=True)
            if result.returncode != 0:
                print(result.stdout + result.stderr)
                failed.append(rel)
    if failed:
        print(f"nvcc check: {len(failed)} of {len(sources)} files failed: {', '.join(failed)}")
        return 1
    print(f"nvcc check: {len(sources)} files compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
