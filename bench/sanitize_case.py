"""A small forward/backward through every CUDA kernel, for compute-sanitizer (memcheck, racecheck)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedbn  # noqa: E402

for dtype in (torch.float32, torch.bfloat16):
    for fmt in (torch.contiguous_format, torch.channels_last):
        for shape in ((3, 33, 5, 7), (2, 8, 64, 64)):
            bn = fusedbn.FusedBatchNorm2d(shape[1], activation="relu").cuda()
            x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt).requires_grad_()
            z = torch.randn_like(x)
            y = bn(x, residual=z)
            y.float().sum().backward()
            bn.eval()
            bn(x.detach())
torch.cuda.synchronize()
print("sanitize case done")
