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


def blend_moments(mean: Tensor, m2: Tensor, count, prior_mean: Tensor, prior_var: Tensor, prior_count: float):
    """Chan merge of (count, mean, M2) with prior_count pseudo-samples at (prior_mean, prior_var):
    n = m + m0, δ = μ − μ_R, μ̃ = μ − m0·δ/n, M2̃ = M2 + m0·σ²_R + δ²·m·m0/n. Returns (μ̃, M2̃, n)."""
    n = count + prior_count
    delta = mean - prior_mean
    return mean - prior_count * delta / n, m2 + prior_count * prior_var + delta * delta * count * prior_count / n, n


def reference_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         residual: Optional[Tensor], *, batch_stats: bool, eps: float, activation: str,
                         negative_slope: float, mean: Optional[Tensor] = None, invstd: Optional[Tensor] = None,
                         prior_mean: Optional[Tensor] = None, prior_var: Optional[Tensor] = None,
                         prior_count: float = 0.0) -> Tensor:
    """What FusedBatchNormFunction computes, in the kernels' math type (float64 or float32).

    batch_stats=True: the batch's statistics (a function of input), Chan-merged with prior_count
    pseudo-samples at (prior_mean, prior_var) when prior_count > 0. batch_stats=False: the constants
    (mean, invstd).
    """
    shape = (1, -1, 1, 1)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(dtype)
    if batch_stats:
        m = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=(0, 2, 3))
        m2 = ((x - mean.view(shape)) ** 2).sum(dim=(0, 2, 3))
        if prior_count > 0:
            mean, m2, m = blend_moments(mean, m2, m, prior_mean.to(dtype), prior_var.to(dtype), prior_count)
        invstd = torch.rsqrt(m2 / m + eps)
    y = (x - mean.to(dtype).view(shape)) * invstd.to(dtype).view(shape)
    if weight is not None:
        y = y * weight.to(dtype).view(shape)
    if bias is not None:
        y = y + bias.to(dtype).view(shape)
    if residual is not None:
        y = y + residual.to(dtype)
    return activation_fn(activation, y, negative_slope).to(input.dtype)
