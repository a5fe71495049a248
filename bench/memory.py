"""Memory and time of a whole network's training step on the CPU: nn.BatchNorm2d against fusedbn's fusions.

Networks (tests/cnn_models.py, torchvision's module structure): a ResNet-50-style network (bottleneck stages
3-4-6-3, width 64) and a ResNet-18-style one (basic blocks 2-2-2-2), input (16, 3, 160, 160), float32 and bfloat16.

Variants: nn; fusedbn's batch norm only (convert_model + fuse_activations); conv-BN blocks (fuse_conv_bn_blocks) with
each recompute policy. Memory: each (network, dtype, variant) in a fresh process (one warm-up step, then the measured
step; large allocations returned to the system at once, MALLOC_MMAP_THRESHOLD_). Time: all variants of a (network,
dtype) built in one process and stepped in turn, ``--rounds`` rounds after two warm-up rounds, so that every variant
sees the same machine state; the median per variant.

* saved for backward: bytes of the activations autograd holds for the backward pass (saved_tensors_hooks, storages
  deduplicated; the model's parameters, which autograd references but which exist anyway, are left out).
* peak growth: the step's peak resident memory above the resident memory before it (VmHWM after resetting it via
  /proc/self/clear_refs), i.e. activations, gradients and workspace of one step.
* step time: ratios against nn and against "batch norm only" of the same run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import fusedbn  # noqa: E402
from cnn_models import resnet18_like, resnet50_like  # noqa: E402
from results_md import write_section  # noqa: E402

NETWORKS = {"ResNet-50-style": resnet50_like, "ResNet-18-style": resnet18_like}
VARIANTS = ("nn", "bn-only", "blocks:auto", "blocks:output", "blocks:conv", "blocks:none")
SHAPE = (16, 3, 160, 160)


def build(network: str, variant: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = NETWORKS[network]().to(dtype)
    if variant == "bn-only":
        model = fusedbn.fuse_activations(fusedbn.convert_model(model))
    elif variant.startswith("blocks:"):
        model = fusedbn.fuse_conv_bn_blocks(model, recompute=variant.split(":")[1])
    return model


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure_memory(network: str, variant: str, dtype_name: str) -> None:
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    model = build(network, variant, dtype)
    x = torch.randn(SHAPE, dtype=dtype)
    model(x).float().sum().backward()
    model_tensors = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in model_tensors:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_kib("VmRSS:")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().sum()
    loss.backward()
    print(sum(saved.values()), (_status_kib("VmHWM:") - before) * 1024)


def memory(network, variant, dtype_name):
    """(saved bytes, peak growth bytes) from a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--memory", network, variant, dtype_name], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    return int(out[0]), int(out[1])


def step_times(network, dtype_name, rounds):
    """{variant: median step time}, the variants stepped in turn in this process."""
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    models = {v: build(network, v, dtype) for v in VARIANTS}
    x = torch.randn(SHAPE, dtype=dtype)
    times = {v: [] for v in VARIANTS}
    for r in range(rounds + 2):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            model = models[variant]
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(x).float().sum().backward()
            if r >= 2:
                times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def table(network, dtype_name, rounds):
    mem = {v: memory(network, v, dtype_name) for v in VARIANTS}
    times = step_times(network, dtype_name, rounds)
    (nn_saved, nn_peak), nn_time, bn_time = mem["nn"], times["nn"], times["bn-only"]
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [f"**{network}, {dtype_name}**", "",
             "| variant | activations saved for backward, MiB | × nn | peak growth of the step, MiB | × nn | step, s "
             "| × nn time | × bn-only time |", "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        (saved, peak), t = mem[variant], times[variant]
        lines.append(f"| {variant} | {mib(saved)} | {saved / nn_saved:.2f} | {mib(peak)} | {peak / nn_peak:.2f} | "
                     f"{t:.3f} | {t / nn_time:.2f} | {t / bn_time:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.memory:
        return measure_memory(*args.memory)
    tables = [table(n, d, args.rounds) for n in args.networks for d in args.dtypes]
    text = "\n\n".join([
        f"Command: `python bench/memory.py` ({time.strftime('%Y-%m-%d')}; this project's CPU machine, 2 threads, "
        f"torch {torch.__version__}). Input {SHAPE}; one training step (forward, backward). Memory from a fresh process "
        f"per variant; step time the median of {args.rounds} rounds in one process, the variants in turn. bn-only: "
        "convert_model + fuse_activations; blocks:P: fuse_conv_bn_blocks(recompute=P).", *tables])
    print(text)
    if not args.no_write:
        write_section("memory", text)


if __name__ == "__main__":
    main()
