"""Fused batch norm written with plain torch operations: differentiable to any order.

Used for double backward (``create_graph=True``), and as a readable statement of what the kernels
compute. Not a fast path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def activation_fn(name: str, v: Tensor, negative_slope: float) -> Tensor:
    if name == "relu":
        return F.relu(v)
    if name == "leaky_relu":
        return F.leaky_relu(v, negative_slope)
    if name == "silu":
        return F.silu(v)
    return v


def reference_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         residual: Optional[Tensor], stats_mean: Optional[Tensor], stats_var: Optional[Tensor],
                         batch_stats: bool, prior_count: float, eps: float, activation: str,
                         negative_slope: float) -> Tensor:
    """The function FusedBatchNormFunction computes, in the precision of the parameters' math type."""
    shape = (1, -1, 1, 1)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(dtype)
    if batch_stats:
        m = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=(0, 2, 3))
        m2 = ((x - mean.view(shape)) ** 2).sum(dim=(0, 2, 3))
        if prior_count > 0:
            # Chan merge with prior_count pseudo-samples at (stats_mean, stats_var).
            n = m + prior_count
            delta = mean - stats_mean.to(dtype)
            mean = mean - prior_count * delta / n
            m2 = m2 + prior_count * stats_var.to(dtype) + delta**2 * m * prior_count / n
            m = n
        var = m2 / m
    else:
        mean, var = stats_mean.to(dtype), stats_var.to(dtype)
    y = (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(dtype).view(shape)
    if bias is not None:
        y = y + bias.to(dtype).view(shape)
    if residual is not None:
        y = y + residual.to(dtype)
    return activation_fn(activation, y, negative_slope).to(input.dtype)
