"""The compiled operators (``torch.ops.fusedbn.*``) and their fake kernels.

Importing this module loads the C++ extension, which registers the op schemas and their CPU (and, when
built with CUDA, CUDA) kernels with the PyTorch dispatcher. The fake kernels below describe each op's
outputs so that ``torch.compile`` and ``torch.export`` can trace through them without running them.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: TORCH_LIBRARY(fusedbn) and its kernels)
from .reference import stats_dtype

ops = torch.ops.fusedbn


def layout_format(x: torch.Tensor) -> torch.memory_format:
    """The dense memory format the kernels work in and return outputs in (mirrors ops.cpp)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(x)


def _like_input(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout_format(x))


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=stats_dtype(x))


def _gradient_of(parameter, invstd):
    """A parameter's gradient: per channel, in the parameter's dtype (the statistics' where there is none)."""
    return invstd.new_empty(invstd.shape, dtype=parameter.dtype if parameter is not None else invstd.dtype)


def _grad_residual(x, residual, activation):
    if residual is not None and activation != "identity":
        return _like_input(x)
    return x.new_empty((0,))


@torch.library.register_fake("fusedbn::check_batch_norm")
def _(input, weight, bias, residual, running_mean, running_var, eps, batch_stats):
    return None  # the checks run eagerly; a graph records them as an op without outputs


@torch.library.register_fake("fusedbn::batch_stats")
def _(input):
    return _per_channel(input), _per_channel(input)


@torch.library.register_fake("fusedbn::forward_train")
def _(input, weight, bias, residual, prior_mean, prior_var, prior_count, eps, activation, negative_slope,
      running_mean=None, running_var=None, num_batches_tracked=None, momentum=0.1):
    statistics = tuple(_per_channel(input) for _ in range(4))
    return (_like_input(input),) + statistics + (input.new_empty((), dtype=torch.bool),)


@torch.library.register_fake("fusedbn::normalize")
def _(input, weight, bias, residual, mean, var, eps, activation, negative_slope):
    return _like_input(input), _per_channel(input), _per_channel(input)


@torch.library.register_fake("fusedbn::renormalize")
def _(input, weight, bias, residual, mean, invstd, activation, negative_slope):
    return _like_input(input)


@torch.library.register_fake("fusedbn::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, batch_mean, batch_m2, count, momentum):
    return batch_mean.new_empty((), dtype=torch.bool)


@torch.library.register_fake("fusedbn::backward_reduce")
def _(grad_output, input, residual, mean, invstd, weight, bias, activation, negative_slope):
    return _per_channel(input), _per_channel(input), _gradient_of(weight, invstd)


@torch.library.register_fake("fusedbn::backward_elemt")
def _(grad_output, input, residual, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, activation, negative_slope):
    return _like_input(input), _grad_residual(input, residual, activation)


@torch.library.register_fake("fusedbn::backward")
def _(grad_output, input, residual, mean, invstd, weight, bias, count, activation, negative_slope):
    reduced = count is not None or weight is not None or bias is not None
    grad_weight = _gradient_of(weight, invstd) if reduced else invstd.new_empty((0,))
    grad_bias = _gradient_of(bias, invstd) if reduced else invstd.new_empty((0,))
    return _like_input(input), _grad_residual(input, residual, activation), grad_weight, grad_bias


def cuda_available() -> bool:
    """True when this build of fusedbn has CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedbn::forward_train", "CUDA")
