"""The main job (``python -m fusedbn``): a self-check against nn.BatchNorm2d, then the seed problem and its fix.

The seed (stackoverflow 48320854): a convnet with batch norm, in training mode at batch size 1, outputs all
zeros in TensorFlow; PyTorch raises instead. fusedbn normalises such batches meaningfully.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
from torch import nn

from .modules import FusedBatchNorm2d

SEED_CHANNELS = (64, 128, 256, 256, 256)


class TFBatchNorm2d(nn.BatchNorm2d):
    """TensorFlow/Keras training-mode semantics in plain torch: batch statistics with the biased variance,
    which is 0 at one value per channel, so the output is β; the moving variance slides towards 0."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        shape = (1, -1, 1, 1)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class SeedNet(nn.Module):
    """The seed's network: five [conv 5×5 stride 2 valid → BN → PReLU(0.2)] blocks (64, 128, 256, 256, 256
    channels), then a conv covering the remaining map to 100 channels → BN → tanh. For 160×160 inputs the
    last BN sees (N, 100, 1, 1): one value per channel at batch size 1."""

    def __init__(self, norm: Callable[[int], nn.Module] = nn.BatchNorm2d, in_channels: int = 3,
                 image_size: int = 160):
        super().__init__()
        layers, c, size = [], in_channels, image_size
        for out in SEED_CHANNELS:
            layers += [nn.Conv2d(c, out, 5, stride=2), norm(out), nn.PReLU(out, init=0.2)]
            c, size = out, (size - 5) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 100, size)
        self.head_norm = norm(100)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif hasattr(m, "weight") and hasattr(m, "running_mean") and m.weight is not None:
                nn.init.normal_(m.weight, mean=1.0, std=0.02)

    def logits(self, x):
        return self.head_norm(self.head(self.features(x)))

    def forward(self, x):
        return torch.tanh(self.logits(x))


def _describe(t: torch.Tensor) -> str:
    return (f"shape={tuple(t.shape)}  mean={t.mean().item():+.4f}  std={t.std(unbiased=False).item():.4f}  "
            f"min={t.min().item():+.4f}  max={t.max().item():+.4f}")


def self_check(shapes=((32, 64, 56, 56), (8, 256, 14, 14), (4, 512, 7, 7), (1, 64, 112, 112)), repeats=15):
    """Max error against nn.BatchNorm2d (float32, training forward and input gradient) and speed ratios."""
    print("Self-check against torch.nn.BatchNorm2d (float32, training mode, "
          f"{torch.get_num_threads()} threads, median of {repeats} runs)")
    header = f"{'shape':>18} {'format':>13} {'max|Δy|':>9} {'max|Δdx|':>9} {'fwd speed-up':>12} {'fwd+bwd':>8}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        for fmt, name in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
            ref, fused = nn.BatchNorm2d(shape[1]), FusedBatchNorm2d(shape[1])
            x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
            g = torch.randn(shape).contiguous(memory_format=fmt)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ref(xa), fused(xb)
            ya.backward(g)
            yb.backward(g)
            dy, dx = (ya - yb).abs().max().item(), (xa.grad - xb.grad).abs().max().item()
            times = {}
            for label, module in (("nn", ref), ("fused", fused)):
                times[label, "fwd"] = _median_time(lambda: module(x), repeats)
                times[label, "step"] = _median_time(lambda: module(xa).backward(g), repeats)
            print(f"{str(shape):>18} {name:>13} {dy:9.1e} {dx:9.1e} "
                  f"{times['nn', 'fwd'] / times['fused', 'fwd']:11.2f}x "
                  f"{times['nn', 'step'] / times['fused', 'step']:7.2f}x")
    print()


def _median_time(fn, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def seed_problem():
    print("The seed: a convnet with batch norm in training mode at batch size 1 (stackoverflow 48320854)")
    print("Network: 5 x [conv 5x5/2 -> BN -> PReLU(0.2)] (64,128,256,256,256) -> conv to 100 -> BN -> tanh;")
    print("the last BN sees (N, 100, 1, 1): one value per channel at batch size 1.\n")
    torch.manual_seed(0)
    inputs = {1: [torch.randn(1, 3, 160, 160), torch.randn(1, 3, 160, 160)], 2: [torch.randn(2, 3, 160, 160)]}
    variants = [
        ("torch.nn.BatchNorm2d", nn.BatchNorm2d),
        ("TensorFlow semantics", TFBatchNorm2d),
        ("fusedbn small_batch='running'", lambda c: FusedBatchNorm2d(c, small_batch="running")),
        ("fusedbn small_batch='blend'", lambda c: FusedBatchNorm2d(c, small_batch="blend")),
        ("fusedbn small_batch='error'", lambda c: FusedBatchNorm2d(c, small_batch="error")),
    ]
    base = SeedNet()
    for name, norm in variants:
        torch.manual_seed(1)
        net = SeedNet(norm)
        net.load_state_dict(base.state_dict())
        net.train()
        print(f"== {name}")
        for batch in (1, 2):
            x = inputs[batch][0].clone().requires_grad_()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    logits = net.logits(x)
            except ValueError as e:
                print(f"  batch {batch}: ValueError: {e}")
                continue
            out = torch.tanh(logits)
            print(f"  batch {batch}: outputs {_describe(out)}")
            print(f"           logits  {_describe(logits)}")
            if batch == 1:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    other = net(inputs[1][1])
                out.sum().backward()
                print(f"           two different inputs: max|out1 - out2| = {(out - other).abs().max().item():.4f};"
                      f" input gradient norm = {x.grad.norm().item():.3e}")
        print()


def main():
    torch.set_num_threads(torch.get_num_threads())
    start = time.time()
    self_check()
    seed_problem()
    print(f"done in {time.time() - start:.1f} s")
