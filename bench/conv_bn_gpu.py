"""GPU memory and time of a ResNet-50-style training step (tests/cnn_models.py, batch 64, 224×224): nn against
fusedbn's batch norm only and its conv-BN blocks. Peak memory is torch.cuda.max_memory_allocated above the memory
allocated before the step; time the median of STEPS steps (CUDA events), after warm-up. Run by bench/gpu_check.sh."""

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import fusedbn  # noqa: E402
from cnn_models import resnet50_like  # noqa: E402

VARIANTS = {"nn": lambda m: m, "bn-only": lambda m: fusedbn.fuse_activations(fusedbn.convert_model(m)),
            "blocks:auto": fusedbn.fuse_conv_bn_blocks,
            "blocks:conv": lambda m: fusedbn.fuse_conv_bn_blocks(m, recompute="conv")}
STEPS = 10


def measure(variant, dtype, batch):
    torch.manual_seed(0)
    model = VARIANTS[variant](resnet50_like().to("cuda", dtype).to(memory_format=torch.channels_last))
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del model, x
    torch.cuda.empty_cache()
    return peak, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [f"ResNet-50-style (tests/cnn_models.py), batch {args.batch}, 224×224, channels_last, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}", "",
             "| dtype | variant | peak memory growth of the step, MiB | × nn | step, ms | × nn |", "|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        results = {v: measure(v, dtype, args.batch) for v in VARIANTS}
        nn_peak, nn_time = results["nn"]
        for v, (peak, t) in results.items():
            lines.append(f"| {str(dtype)[6:]} | {v} | {peak / 2**20:.0f} | {peak / nn_peak:.2f} | {t:.1f} | "
                         f"{t / nn_time:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
