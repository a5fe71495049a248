"""Memory and time of a whole network's training step on the CPU: nn.BatchNorm2d against fusedbn's fusions.

Networks (tests/cnn_models.py, torchvision's module structure): a ResNet-50-style network (bottleneck stages
3-4-6-3, width 64) and a ResNet-18-style one (basic blocks 2-2-2-2), input (16, 3, 160, 160), float32 and bfloat16.

Variants: nn; fusedbn's batch norm only (convert_model + fuse_activations); conv-BN blocks (fuse_conv_bn_blocks) with
each recompute policy. Each (network, dtype, variant) runs in a fresh process, the variants in alternating order,
``--rounds`` rounds; per process: one warm-up step, then one step measured for memory (with large allocations
returned to the system at once, MALLOC_MMAP_THRESHOLD_) or STEPS timed steps (glibc's default allocator, another
process).

* saved for backward: bytes of the activations autograd holds for the backward pass (saved_tensors_hooks, storages
  deduplicated; the model's parameters, which autograd references but which exist anyway, are left out).
* peak growth: the step's peak resident memory above the resident memory before it (VmHWM after resetting it via
  /proc/self/clear_refs), i.e. activations, gradients and workspace of one step.
* step time: median over the timed steps and rounds; ratios against nn and against "batch norm only" of the same run.
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
STEPS = 4


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


def measure(network: str, variant: str, dtype_name: str, what: str) -> None:
    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    model = build(network, variant, dtype)
    x = torch.randn(SHAPE, dtype=dtype)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    step()
    if what == "time":
        times = []
        for _ in range(STEPS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(*times)
        return
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


def run(network, variant, dtype_name):
    """(saved bytes, peak growth bytes, step times) from two fresh processes."""
    command = [sys.executable, __file__, "--one", network, variant, dtype_name]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    memory = subprocess.run(command + ["memory"], capture_output=True, text=True, check=True, env=env).stdout.split()
    times = subprocess.run(command + ["time"], capture_output=True, text=True, check=True).stdout.split()
    return int(memory[0]), int(memory[1]), [float(v) for v in times]


def table(network, dtype_name, rounds):
    results = {v: [None, None, []] for v in VARIANTS}
    for r in range(rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            saved, peak, times = run(network, variant, dtype_name)
            res = results[variant]
            res[0], res[1] = saved, peak if res[1] is None else min(res[1], peak)
            res[2] += times
    nn_saved, nn_peak, nn_times = results["nn"]
    bn_time = statistics.median(results["bn-only"][2])
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [f"**{network}, {dtype_name}**", "",
             "| variant | activations saved for backward, MiB | × nn | peak growth of the step, MiB | × nn | step, s | × nn time "
             "| × bn-only time |", "|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        saved, peak, times = results[variant]
        t = statistics.median(times)
        lines.append(f"| {variant} | {mib(saved)} | {saved / nn_saved:.2f} | {mib(peak)} | {peak / nn_peak:.2f} | "
                     f"{t:.3f} | {t / statistics.median(nn_times):.2f} | {t / bn_time:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.one:
        return measure(*args.one)
    tables = [table(n, d, args.rounds) for n in args.networks for d in args.dtypes]
    text = "\n\n".join([
        f"Command: `python bench/memory.py` ({time.strftime('%Y-%m-%d')}; this project's CPU machine, 2 threads, "
        f"torch {torch.__version__}). Input {SHAPE}; one training step (forward, backward); {args.rounds} rounds of "
        f"fresh processes per variant, alternating; step time the median of {STEPS} steps per process over all "
        "rounds, peak growth the smallest over rounds. bn-only: convert_model + fuse_activations; blocks:P: "
        "fuse_conv_bn_blocks(recompute=P).", *tables])
    print(text)
    if not args.no_write:
        write_section("memory", text)


if __name__ == "__main__":
    main()
