"""Eval-mode forward of a conv-BN-activation block against its conv alone, on the CPU.

FusedConvBatchNorm2d in eval folds the batch norm into the conv's weight and bias (cached), so the block is one conv
plus the activation applied in place; the bar is at most 1.05× the time of the conv alone (F.conv2d with a bias).
nn.Conv2d → nn.BatchNorm2d → activation (eval) is shown beside it. Shapes: ResNet-50 and MobileNetV2 layers at
batch 16 (input of the conv); median of many interleaved rounds, torch.no_grad().
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusedbn  # noqa: E402
from results_md import write_section  # noqa: E402

# (name, input shape, out_channels, kernel, stride, groups, activation)
CASES = [
    ("ResNet-50 layer1 conv2 3×3", (16, 64, 40, 40), 64, 3, 1, 1, "relu"),
    ("ResNet-50 layer1 conv3 1×1", (16, 64, 40, 40), 256, 1, 1, 1, "relu"),
    ("ResNet-50 layer3 conv2 3×3", (16, 256, 10, 10), 256, 3, 1, 1, "relu"),
    ("MobileNetV2 depthwise 3×3", (16, 144, 40, 40), 144, 3, 1, 144, "relu6"),
    ("MobileNetV2 project 1×1", (16, 144, 20, 20), 24, 1, 1, 1, "identity"),
]


def bench(fn, rounds):
    for _ in range(3):
        fn()
    return [_timed(fn) for _ in range(rounds)]


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = ["| layer | input | conv alone, ms | block (eval), ms | × conv | nn conv → BN → act, ms | × conv |",
             "|---|---|---|---|---|---|---|"]
    for name, shape, cout, k, stride, groups, act in CASES:
        torch.manual_seed(0)
        block = fusedbn.FusedConvBatchNorm2d(shape[1], cout, k, stride, k // 2, groups=groups, activation=act).eval()
        with torch.no_grad():
            block.bn.running_mean.normal_(), block.bn.running_var.uniform_(0.5, 2)
        act_module = {"relu": nn.ReLU(inplace=True), "relu6": nn.ReLU6(inplace=True), "identity": nn.Identity()}[act]
        reference = nn.Sequential(block.conv, nn.BatchNorm2d(cout), act_module).eval()
        reference[1].load_state_dict(block.bn.state_dict())
        x = torch.randn(shape)
        weight, bias = block.conv.weight.detach(), torch.randn(cout)
        fns = {"conv": lambda: F.conv2d(x, weight, bias, stride, k // 2, 1, groups), "block": lambda: block(x),
               "nn": lambda: reference(x)}
        times = {key: [] for key in fns}
        with torch.no_grad():
            for _ in range(args.rounds // 5):  # interleaved groups of 5
                for key, fn in fns.items():
                    times[key] += bench(fn, 5)
        ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        lines.append(f"| {name} | {shape} | {ms['conv']:.2f} | {ms['block']:.2f} | {ms['block'] / ms['conv']:.2f} | "
                     f"{ms['nn']:.2f} | {ms['nn'] / ms['conv']:.2f} |")
    text = "\n".join([f"Command: `python bench/conv_bn_eval.py` ({time.strftime('%Y-%m-%d')}; this project's CPU "
                      f"machine, 2 threads, torch {torch.__version__}, float32, torch.no_grad(); median of "
                      f"{args.rounds} interleaved calls each).", "", *lines])
    print(text)
    if not args.no_write:
        write_section("conv_bn_eval", text)


if __name__ == "__main__":
    main()
