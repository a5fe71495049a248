"""The derivatives of fused batch norm for FusedBatchNormFunction (function.py), the path of forward-mode AD and
torch.func transforms.

* ``save`` + ``input_gradients``: the backward (vector-Jacobian product), through ``torch.ops.fusedbn.backward``,
  or, where a graph of the backward is needed (``create_graph=True``, torch.func), through the same gradients
  in torch operations (``reference.reference_input_gradients``), so that higher derivatives exist.
* ``output_tangent``: the forward-mode derivative (Jacobian-vector product), in torch operations.

The ops themselves carry the same backward in C++ (csrc/batch_norm/autograd/register.cpp), which calls the fused
backward op or ``fusedbn::backward_composite``: reference_input_gradients, registered below.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._ops import ops
from .reference import CHANNEL, activation_derivative, normalised, reference_input_gradients

def save(ctx, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
         mean: Tensor, invstd: Tensor, batch_mean: Optional[Tensor], prior_mean: Optional[Tensor],
         prior_var: Optional[Tensor], batch_stats: bool, prior_count: float, eps: float, activation: str,
         negative_slope: float) -> None:
    """Stores on ctx what input_gradients and output_tangent need: x, the per-channel vectors, and the residual
    only where the activation's derivative needs it; never the output."""
    n, _, h, w = input.shape
    ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: no zeros to allocate
    ctx.batch_count = float(n * h * w)
    ctx.count = ctx.batch_count + prior_count if batch_stats else None
    ctx.batch_stats, ctx.prior_count, ctx.eps = batch_stats, prior_count, eps
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.has_residual = residual is not None
    blended = batch_stats and prior_count > 0
    ctx.save_for_backward(input, weight, bias, residual if activation != "identity" else None, mean, invstd,
                          prior_mean if blended else None, prior_var if blended else None)
    ctx.save_for_forward(input, weight, bias, residual, mean, invstd, batch_mean if blended else None)


def input_gradients(ctx, grad_output: Optional[Tensor]) -> tuple:
    """(grad_input, grad_weight, grad_bias, grad_residual), None where not needed."""
    if grad_output is None:  # the output was not used
        return None, None, None, None
    input, weight, bias, residual, mean, invstd, prior_mean, prior_var = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        # create_graph=True (or a torch.func transform): the gradients in torch operations, which differentiate again.
        grad_input, grad_weight, grad_bias, grad_residual = reference_input_gradients(
            grad_output, input, weight, bias, residual, batch_stats=ctx.batch_stats, eps=ctx.eps,
            activation=ctx.activation, negative_slope=ctx.negative_slope, mean=mean, invstd=invstd,
            prior_mean=prior_mean, prior_var=prior_var, prior_count=ctx.prior_count)
    else:
        grad_input, grad_residual, grad_weight, grad_bias = ops.backward(
            grad_output, input, residual, mean, invstd, weight, bias, ctx.count, ctx.activation, ctx.negative_slope)
    if ctx.has_residual and ctx.activation == "identity":
        grad_residual = grad_output  # dz = dy: z was not saved
    grads = (grad_input, grad_weight, grad_bias, grad_residual)
    return tuple(g if need else None for g, need in zip(grads, needs))


def output_tangent(ctx, d_input: Optional[Tensor], d_weight: Optional[Tensor], d_bias: Optional[Tensor],
                   d_residual: Optional[Tensor]) -> Optional[Tensor]:
    """The output's tangent for tangents of (input, weight, bias, residual), None meaning zero.

    With x̂ = (x − μ)·s, s = 1/sqrt(σ² + eps) and batch statistics of m values (blended with m0 pseudo-samples,
    n = m + m0, μ = μ_B − m0·δ/n, δ = μ_B − μ_R, σ² = (M2_B + m0·σ²_R + δ²·m·m0/n)/n):
      dμ = (m/n)·mean(dx),  dσ² = (2·Σ(x − μ_B)·dx + 2·(μ_B − μ)·m·mean(dx))/n,  ds = −s³·dσ²/2,
      dx̂ = (dx − dμ)·s + (x − μ)·ds   (constant statistics: dx̂ = dx·s),
      dy = act'(pre)·(dx̂·w + x̂·dw + db + dr),  pre = x̂·w + b + r.
    """
    input, weight, bias, residual, mean, invstd, batch_mean = ctx.saved_tensors
    if d_input is None and d_weight is None and d_bias is None and d_residual is None:
        return None
    x_hat, pre, _, _ = normalised(input, weight, bias, residual, False, ctx.eps, mean, invstd, None, None, 0.0)
    dtype = x_hat.dtype
    x = input.to(dtype)
    s = invstd.view(CHANNEL)
    centred = x - mean.view(CHANNEL)
    d_pre = None
    if d_input is not None:
        dx = d_input.to(dtype)
        if ctx.batch_stats:
            m, n = ctx.batch_count, ctx.count
            d_batch_mean = dx.mean(dim=(0, 2, 3))
            if batch_mean is None:  # no prior: μ = μ_B
                d_m2 = 2 * (centred * dx).sum(dim=(0, 2, 3))
            else:
                d_m2 = 2 * ((x - batch_mean.view(CHANNEL)) * dx).sum(dim=(0, 2, 3)) \
                    + 2 * (batch_mean - mean) * m * d_batch_mean
            d_invstd = -0.5 * invstd.pow(3) * (d_m2 / n)
            d_x_hat = (dx - (m / n) * d_batch_mean.view(CHANNEL)) * s + centred * d_invstd.view(CHANNEL)
        else:
            d_x_hat = dx * s
        d_pre = d_x_hat * weight.to(dtype).view(CHANNEL) if weight is not None else d_x_hat
    for term in (None if d_weight is None else x_hat * d_weight.to(dtype).view(CHANNEL),
                 None if d_bias is None else d_bias.to(dtype).view(CHANNEL).expand_as(x),
                 None if d_residual is None else d_residual.to(dtype)):
        if term is not None:
            d_pre = term if d_pre is None else d_pre + term
    if ctx.activation != "identity":
        d_pre = d_pre * activation_derivative(ctx.activation, pre, ctx.negative_slope)
    return d_pre.to(input.dtype)


def _backward_composite(grad_output, input, weight, bias, residual, mean, invstd, prior_mean, prior_var, batch_stats,
                        prior_count, eps, activation, negative_slope):
    grads = reference_input_gradients(
        grad_output, input, weight, bias, residual, batch_stats=batch_stats, eps=eps, activation=activation,
        negative_slope=negative_slope, mean=mean, invstd=invstd, prior_mean=prior_mean, prior_var=prior_var,
        prior_count=prior_count)
    return tuple(g if g is not None else mean.new_empty((0,)) for g in grads)


_library = torch.library.Library("fusedbn", "IMPL")
_library.impl("backward_composite", _backward_composite, "CompositeImplicitAutograd")
