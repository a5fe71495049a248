"""Fused batch norm written with plain torch operations: differentiable to any order.

``reference_batch_norm`` states what the kernels compute; ``reference_input_gradients`` is its gradient in torch
operations, the backward under ``create_graph=True`` and torch.func (``fusedbn::backward_composite``); the
activations' derivatives serve forward-mode AD too. tests/test_autograd.py checks the kernels and the gradients
against the statement. Not a fast path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNEL = (1, -1, 1, 1)  # a per-channel vector viewed against an (N, C, H, W) tensor

# The activations the kernels fuse (csrc/common/activation.h), as nn modules; "identity" is none.
ACTIVATION_MODULES = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU, "relu6": nn.ReLU6,
                      "hardswish": nn.Hardswish, "gelu": nn.GELU}
ACTIVATIONS = ("identity",) + tuple(ACTIVATION_MODULES)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Per-channel statistics (and the kernels' math) are float64 for float64 input and float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def activation_fn(name: str, v: Tensor, negative_slope: float, inplace: bool = False) -> Tensor:
    """act(v); ``inplace`` overwrites v where torch has the in-place form (all but gelu)."""
    if name == "relu":
        return F.relu(v, inplace=inplace)
    if name == "leaky_relu":
        return F.leaky_relu(v, negative_slope, inplace=inplace)
    if name == "silu":
        return F.silu(v, inplace=inplace)
    if name == "relu6":
        return F.relu6(v, inplace=inplace)
    if name == "hardswish":
        return F.hardswish(v, inplace=inplace)
    if name == "gelu":
        return F.gelu(v)
    return v


def activation_derivative(name: str, pre: Tensor, negative_slope: float) -> Tensor:
    """act'(pre), with nn's convention at the kinks (the derivative of relu and leaky_relu at 0 is that of the
    left side)."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "leaky_relu":
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, negative_slope))
    if name == "silu":
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if name == "relu6":  # 1 strictly inside (0, 6), as hardtanh's backward
        return ((pre > 0) & (pre < 6)).to(pre.dtype)
    if name == "hardswish":  # 0 below −3, v/3 + ½ up to 3, then 1
        return torch.where(pre < -3, torch.zeros_like(pre), torch.where(pre <= 3, pre / 3 + 0.5, torch.ones_like(pre)))
    if name == "gelu":  # Φ(v) + v·φ(v)
        return 0.5 * (1 + torch.erf(pre * 0.5 ** 0.5)) + pre * torch.exp(-0.5 * pre * pre) * (2 * math.pi) ** -0.5
    return torch.ones_like(pre)


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two sets given as (count, mean, M2), Chan et al.:
    n = na + nb, δ = mean_b − mean_a, mean = mean_a + δ·nb/n, M2 = M2a + M2b + δ²·na·nb/n. Counts may be tensors;
    an empty union (n = 0) keeps side a."""
    count = count_a + count_b
    share = count_b / count.clamp(min=1) if torch.is_tensor(count) else count_b / count
    delta = mean_b - mean_a
    return count, mean_a + delta * share, m2_a + m2_b + delta * delta * count_a * share


def blend_moments(mean: Tensor, m2: Tensor, count, prior_mean: Tensor, prior_var: Tensor, prior_count: float):
    """The batch moments merged with prior_count pseudo-samples at (prior_mean, prior_var). Returns (mean, M2, n)."""
    n, mean, m2 = chan_merge(count, mean, m2, prior_count, prior_mean, prior_var * prior_count)
    return mean, m2, n


def normalised(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                batch_stats: bool, eps: float, mean: Optional[Tensor], invstd: Optional[Tensor],
                prior_mean: Optional[Tensor], prior_var: Optional[Tensor], prior_count: float):
    """(x̂, pre-activation, count) in the kernels' math type; count is the number of values the statistics come from
    (None for given statistics). With batch_stats the statistics are functions of input, so that everything built
    on them differentiates through them."""
    dtype = stats_dtype(input)
    x = input.to(dtype)
    count = None
    if batch_stats:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(dim=(0, 2, 3))
        m2 = ((x - mean.view(CHANNEL)) ** 2).sum(dim=(0, 2, 3))
        if prior_count > 0:
            mean, m2, count = blend_moments(mean, m2, count, prior_mean.to(dtype), prior_var.to(dtype), prior_count)
        invstd = torch.rsqrt(m2 / count + eps)
    x_hat = (x - mean.to(dtype).view(CHANNEL)) * invstd.to(dtype).view(CHANNEL)
    pre = x_hat
    if weight is not None:
        pre = pre * weight.to(dtype).view(CHANNEL)
    if bias is not None:
        pre = pre + bias.to(dtype).view(CHANNEL)
    if residual is not None:
        pre = pre + residual.to(dtype)
    return x_hat, pre, count, invstd.to(dtype)


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
    _, pre, _, _ = normalised(input, weight, bias, residual, batch_stats, eps, mean, invstd, prior_mean, prior_var,
                               prior_count)
    return activation_fn(activation, pre, negative_slope).to(input.dtype)


def reference_input_gradients(grad_output: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              residual: Optional[Tensor], *, batch_stats: bool, eps: float, activation: str,
                              negative_slope: float, mean: Optional[Tensor] = None, invstd: Optional[Tensor] = None,
                              prior_mean: Optional[Tensor] = None, prior_var: Optional[Tensor] = None,
                              prior_count: float = 0.0) -> tuple:
    """(grad_input, grad_weight, grad_bias, grad_residual) of reference_batch_norm, in torch operations, so that they
    differentiate again (double backward, torch.func.hessian). With g = dy·act'(pre), n values per channel:
      grad_bias = Σg,  grad_weight = Σg·x̂,  grad_residual = g,
      grad_input = w·invstd·(g − Σg/n − x̂·Σ(g·x̂)/n)   (given statistics: w·invstd·g).
    """
    x_hat, pre, count, invstd = normalised(input, weight, bias, residual, batch_stats, eps, mean, invstd,
                                            prior_mean, prior_var, prior_count)
    g = grad_output.to(x_hat.dtype)
    if activation != "identity":
        g = g * activation_derivative(activation, pre, negative_slope)
    grad_bias = g.sum(dim=(0, 2, 3))
    grad_weight = (g * x_hat).sum(dim=(0, 2, 3))
    scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
    centred = g if count is None else \
        g - (grad_bias / count).view(CHANNEL) - x_hat * (grad_weight / count).view(CHANNEL)
    grad_input = scale.view(CHANNEL) * centred
    return (grad_input.to(input.dtype), None if weight is None else grad_weight.to(weight.dtype),
            None if bias is None else grad_bias.to(bias.dtype), g.to(input.dtype))
