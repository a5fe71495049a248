#!/usr/bin/env bash
# One prepared GPU check for an H100/H200 machine (torch 2.11+cu130, nvcc 13.0, ninja, pytest installed; no
# network): build with CUDA, run the CUDA tests, compute-sanitizer (memcheck, racecheck) on a small case, and the
# GPU benchmark, then the conv-BN blocks' memory and time. Logs and the results table go to $OUT (default /tmp/fusedbn_gpu); the table is printed last.
# Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedbn_gpu}
mkdir -p "$OUT"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "environment"
{ $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nvidia-smi -L
  "$CUDA_HOME/bin/nvcc" --version | tail -2; c++ --version | head -1; } 2>&1 | tee "$OUT/env.txt"

step "build"
if ! timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import fusedbn; assert fusedbn.cuda_available(), 'built without CUDA kernels'; print('cuda kernels: ok')"

step "CUDA tests"
timeout 180 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_integration.py -k "cuda" 2>&1 \
  | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" | tail -40

step "compute-sanitizer"
SAN=$CUDA_HOME/bin/compute-sanitizer
for tool in memcheck racecheck; do  # no caching allocator: an access past a tensor's end is then an error
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 75 "$SAN" --tool "$tool" --error-exitcode 3 $PY bench/sanitize_case.py > "$OUT/$tool.log" 2>&1
  echo "$tool: exit $? ($(grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/$tool.log" | tail -1))"
done

step "GPU benchmark"
timeout 200 $PY bench/bench_gpu.py --out "$OUT/gpu_results.md" --profile "$OUT/profile.txt" > "$OUT/bench.log" 2>&1 \
  || tail -30 "$OUT/bench.log"
step "conv-BN blocks: ResNet-50-style memory and time"
timeout 120 $PY bench/conv_bn_gpu.py --out "$OUT/conv_bn_gpu.md" > "$OUT/conv_bn_gpu.log" 2>&1 \
  || tail -30 "$OUT/conv_bn_gpu.log"
step "done"
cat "$OUT/gpu_results.md" "$OUT/conv_bn_gpu.md" 2>/dev/null
