"""The vmap rule of fused batch norm: the mapped dimension folded into the channels.

Batch norm treats channels independently, so B maps of an (N, C, H, W) batch norm are one batch norm of
(N, B·C, H, W) whose channel b·C + c is channel c of map b: per-channel parameters and statistics of shape (B, C)
become (B·C,), unmapped ones are repeated B times. One call of the kernels instead of B.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def _fold_spatial(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    if t is None:
        return None
    if dim is None:
        t = t.unsqueeze(1).expand(t.shape[0], size, *t.shape[1:])
    else:
        t = t.movedim(dim, 1)
    n, b, c, h, w = t.shape
    return t.reshape(n, b * c, h, w)


def _fold_channel(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    if t is None:
        return None
    return t.repeat(size) if dim is None else t.movedim(dim, 0).reshape(-1)


def apply_folded(apply: Callable, size: int, in_dims: tuple, tensors: tuple, options: tuple):
    """Runs apply(input, weight, bias, residual, stats_mean, stats_var, *options) on the folded tensors and
    returns the outputs and their out_dims as autograd.Function.vmap does."""
    input, weight, bias, residual, stats_mean, stats_var = tensors
    input_dim, weight_dim, bias_dim, residual_dim, mean_dim, var_dim = in_dims[:6]
    if any(d is not None for d in in_dims[6:]):
        raise ValueError("fusedbn: vmap over the options or the running statistics is not supported")
    outputs = apply(_fold_spatial(input, input_dim, size), _fold_channel(weight, weight_dim, size),
                    _fold_channel(bias, bias_dim, size), _fold_spatial(residual, residual_dim, size),
                    _fold_channel(stats_mean, mean_dim, size), _fold_channel(stats_var, var_dim, size), *options)
    output, *statistics = outputs
    n, _, h, w = output.shape
    unfolded = [output.view(n, size, -1, h, w)]
    dims = [1]
    for t in statistics:  # per-channel vectors, empty ones (eval) and the `updated` flag
        per_channel = t.dim() == 1 and t.numel() > 0
        unfolded.append(t.view(size, -1) if per_channel else t)
        dims.append(0 if per_channel else None)
    return tuple(unfolded), tuple(dims)
