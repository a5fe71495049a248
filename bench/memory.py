"""Memory of a training step of a ResNet-like stack: nn.BatchNorm2d + nn.ReLU against fusedbn (converted with
convert_model, activations and residual adds folded with fuse_activations).

Reports the bytes autograd saves for backward (counted with saved_tensors_hooks, storages deduplicated) and the
peak resident memory of one forward+backward, each variant in a fresh process. Writes into bench/RESULTS.md.
"""

import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusedbn  # noqa: E402
from results_md import write_section  # noqa: E402

SHAPE = (32, 64, 56, 56)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def model(variant):
    torch.manual_seed(0)
    m = nn.Sequential(Block(SHAPE[1]), Block(SHAPE[1]), Block(SHAPE[1]))
    return fusedbn.fuse_activations(fusedbn.convert_model(m)) if variant == "fusedbn" else m


def measure(variant):
    torch.set_num_threads(2)
    m = model(variant)
    x = torch.randn(SHAPE, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{sum(saved.values())} {peak * 1024}")


def main():
    if len(sys.argv) > 1:
        return measure(sys.argv[1])
    results = {}
    for variant in ("nn", "fusedbn"):
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True, text=True, check=True)
        results[variant] = [int(v) for v in out.stdout.split()]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    (s_nn, p_nn), (s_f, p_f) = results["nn"], results["fusedbn"]
    text = "\n".join([
        f"Command: `python bench/memory.py` ({time.strftime('%Y-%m-%d')}). Three ResNet basic blocks "
        f"(conv-BN-ReLU, conv-BN, + x, ReLU), input {SHAPE} float32, one training step on the CPU.", "",
        "| variant | saved for backward | peak RSS growth of the step |", "|---|---|---|",
        f"| nn.BatchNorm2d + nn.ReLU | {mib(s_nn)} | {mib(p_nn)} |",
        f"| fusedbn (converted + fused) | {mib(s_f)} | {mib(p_f)} |",
        f"| ratio | {s_f / s_nn:.2f} | {p_f / p_nn:.2f} |"])
    print(text)
    write_section("memory", text)


if __name__ == "__main__":
    main()
