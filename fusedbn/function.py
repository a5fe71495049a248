"""The functional API of fused batch norm and its autograd Function.

Layering: ``FusedBatchNorm2d`` (modules.py) → ``fused_batch_norm`` / ``batch_norm`` (here: argument checks,
small-batch policy) → ``torch.ops.fusedbn.*`` (C++ dispatch, _ops.py; differentiable through a C++ autograd node;
the training forward also updates the running statistics) → CPU/CUDA kernels. Forward-mode AD and torch.func
transforms take ``FusedBatchNormFunction`` (jvp, vmap) on the way to the same ops.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad

from ._ops import ops
from . import derivatives, vmap_rule
from .reference import ACTIVATIONS, activation_fn

SMALL_BATCH_MODES = ("running", "blend", "error")


class FusedBatchNormFunction(torch.autograd.Function):
    """y = act((x − mean)·invstd·weight + bias [+ residual]), differentiable in input, weight, bias, residual.

    Returns (output, mean, invstd, batch_mean, batch_m2, updated), as ``torch.ops.fusedbn.forward_train``; only
    the output is differentiable. With ``batch_stats=True`` the statistics are the batch's own, blended with
    ``prior_count`` pseudo-samples at (stats_mean, stats_var) when prior_count > 0; batch_mean and
    batch_m2 = Σ(x − mean)² are per channel, and running_mean, running_var and num_batches_tracked (where given)
    are updated in place by ``momentum`` (None: cumulative average), skipped for a non-finite batch (``updated``
    says whether they were). With ``batch_stats=False`` the statistics are (stats_mean, stats_var), constants as
    in eval mode; batch_mean and batch_m2 are empty and nothing is updated.

    Backward, forward-mode AD (``jvp``) and ``vmap`` are defined, so ``torch.func`` transforms work; the
    derivatives are those of derivatives.py; the ops carry the same backward in C++ (csrc/batch_norm/autograd/).
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        # torch.autograd.Function.apply binds the arguments to forward's signature (inspect.signature, ~20 µs) for
        # every Function with setup_context; with every argument given positionally and no torch.func transform
        # active, that binding changes nothing, so the C++ apply is called directly.
        if kwargs or len(args) != 15 or torch._C._are_functorch_transforms_active():
            return super().apply(*args, **kwargs)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    @staticmethod
    def forward(input, weight, bias, residual, stats_mean, stats_var, batch_stats: bool, prior_count: float,
                eps: float, activation: str, negative_slope: float, running_mean, running_var, num_batches_tracked,
                momentum: Optional[float]):
        output, mean, invstd, batch_mean, batch_m2, updated = _forward(
            input, weight, bias, residual, stats_mean, stats_var, batch_stats, prior_count, eps, activation,
            negative_slope, running_mean, running_var, num_batches_tracked, momentum)
        if not batch_stats:
            batch_mean, batch_m2 = mean.new_empty((0,)), mean.new_empty((0,))
            updated = mean.new_zeros((), dtype=torch.bool)
        return output, mean, invstd, batch_mean, batch_m2, updated

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, residual, stats_mean, stats_var, batch_stats, prior_count, eps, activation, slope = \
            inputs[:11]
        _, mean, invstd, batch_mean, batch_m2, updated = outputs
        ctx.mark_non_differentiable(mean, invstd, batch_mean, batch_m2, updated)
        derivatives.save(ctx, input, weight, bias, residual, mean, invstd, batch_mean, stats_mean, stats_var,
                         batch_stats, prior_count, eps, activation, slope)

    @staticmethod
    def backward(ctx, grad_output, *_statistics):
        return derivatives.input_gradients(ctx, grad_output) + (None,) * 11

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, d_residual, d_stats_mean, d_stats_var, _0, _1, _2, _3, _4,
            d_running_mean, d_running_var, *_options):
        if any(t is not None for t in (d_stats_mean, d_stats_var, d_running_mean, d_running_var)):
            raise RuntimeError("fusedbn: running_mean and running_var (or the statistics passed in their place) carry "
                               "a forward-mode tangent; batch norm treats them as constants, as nn.BatchNorm2d does")
        tangent = derivatives.output_tangent(ctx, d_input, d_weight, d_bias, d_residual)
        return (tangent,) + (None,) * 5

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, stats_mean, stats_var, *options):
        return vmap_rule.apply_folded(FusedBatchNormFunction.apply, info.batch_size, in_dims,
                                      (input, weight, bias, residual, stats_mean, stats_var), options)


def _forward(input, weight, bias, residual, stats_mean, stats_var, batch_stats, prior_count, eps, activation,
             negative_slope, running_mean, running_var, num_batches_tracked, momentum):
    """(output, mean, invstd, batch_mean, batch_m2, updated) of FusedBatchNormFunction.forward (see its docstring);
    the last three are None when batch_stats is False."""
    if batch_stats:
        return ops.forward_train(input, weight, bias, residual, stats_mean, stats_var, prior_count, eps, activation,
                                 negative_slope, running_mean, running_var, num_batches_tracked, momentum)
    output, mean, invstd = ops.normalize(input, weight, bias, residual, stats_mean, stats_var, eps, activation,
                                         negative_slope)
    return output, mean, invstd, None, None, None


def check_options(eps, momentum, activation, negative_slope, small_batch, min_count, prior_count,
                  momentum_may_be_none: bool = False) -> None:
    """Raises ValueError for an option outside its domain (shared by the functional API and the modules)."""
    # eps and momentum: any real number, as nn accepts (the sign of eps is checked when a batch is normalised, with
    # nn's messages); NaN and infinity are refused, since they would corrupt the running statistics.
    if not _is_finite_real(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if momentum is None:
        if not momentum_may_be_none:
            raise ValueError("momentum must be a finite number, got None")
    elif not _is_finite_real(momentum):
        raise ValueError(f"momentum must be a finite number{' or None' if momentum_may_be_none else ''}, "
                         f"got {momentum!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) \
            or not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if small_batch not in SMALL_BATCH_MODES:
        raise ValueError(f"small_batch must be one of {', '.join(map(repr, SMALL_BATCH_MODES))}, "
                         f"got {small_batch!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if isinstance(prior_count, bool) or not isinstance(prior_count, (int, float)) \
            or not math.isfinite(prior_count) or prior_count < 0:
        raise ValueError(f"prior_count must be a finite number >= 0, got {prior_count!r}")


def _is_finite_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def check_eps(eps: float, training: bool) -> None:
    """nn's rule and error for eps, as the installed torch has them (torch 2.13 refuses eps <= 0 in training and
    eps < 0 otherwise, 2.11 eps <= 0 in both): for eps <= 0, the only values any torch refuses, F.batch_norm itself is
    asked, on a tensor of two values."""
    if eps <= 0.0:
        probe = torch.zeros(2, 1, 1, 1)
        torch.nn.functional.batch_norm(probe, torch.zeros(1), torch.ones(1), training=training, eps=eps)


def small_batch_message(input: Tensor, min_count: int) -> str:
    """PyTorch's error for a training batch with too few values per channel."""
    need = "more than 1 value" if min_count <= 2 else f"more than {min_count - 1} values"
    return f"Expected {need} per channel when training, got input size {input.size()}"


def small_batch_plan(count: int, has_running: bool, small_batch: str, min_count: int, prior_count: float,
                     message: Callable[[], str]) -> tuple:
    """(fixed, prior) for a training batch of `count` values per channel: fixed=True normalises with the running
    statistics; prior > 0 blends that many pseudo-samples at them. Raises ValueError(message()) where the batch
    cannot be normalised (small_batch="error", or one value and no running statistics)."""
    if count >= min_count:
        return False, 0.0
    if small_batch == "error" or (not has_running and count == 1):
        raise ValueError(message())
    if not has_running:
        return False, 0.0
    return (True, 0.0) if small_batch == "running" else (False, float(prior_count))


def compiling() -> bool:
    return torch.compiler.is_compiling()


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               num_batches_tracked: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
               training: bool, momentum: Optional[float], eps: float, activation: str, negative_slope: float,
               residual: Optional[Tensor], small_batch: str, min_count: int, prior_count: float,
               on_fallback: Optional[Callable[[], None]] = None, apply: Optional[Callable] = None) -> Tensor:
    """The implementation behind fused_batch_norm and the modules; options are assumed valid.

    num_batches_tracked (optional) is incremented with each running-statistics update; momentum=None then
    means the cumulative average 1/num_batches_tracked. on_fallback() is called (outside torch.compile)
    when a small batch is normalised with the running statistics. ``apply`` (default: the ops) runs the planned
    normalisation: it takes FusedBatchNormFunction's 15 arguments and returns (output, updated); the conv-BN block
    passes its own, which also differentiates the conv.
    """
    apply = _apply if apply is None else apply
    use_batch_stats = training or running_mean is None
    check_eps(eps, use_batch_stats)
    if not isinstance(input, Tensor) or input.dim() != 4 or (running_mean is None) != (running_var is None) \
            or input.numel() == 0:
        # The ops check their tensors (csrc/batch_norm/ops.cpp); where none of them would run, or the plan below
        # needs a 4-D input, the same checks run alone.
        ops.check_batch_norm(input, weight, bias, residual, running_mean, running_var, eps, use_batch_stats)
        if input.numel() == 0:
            return _empty_batch(input, weight, bias, residual, activation, negative_slope, training,
                                num_batches_tracked if running_mean is not None else None)
    if not use_batch_stats:
        return apply(input, weight, bias, residual, running_mean, running_var, False, 0.0, eps, activation,
                      negative_slope, None, None, None, momentum)[0]

    n, _, h, w = input.shape
    count = n * h * w
    has_running = running_mean is not None
    if training and has_running and torch._C._are_functorch_transforms_active() \
            and torch._C._functorch.is_batchedtensor(input):
        raise RuntimeError("fusedbn: vmap over a batch norm in training mode would update running_mean and "
                           "running_var, which are not batched, in place (nn.BatchNorm2d refuses this too). Use "
                           "track_running_stats=False or eval mode")
    prior_mean = prior_var = None
    if count < min_count:
        fixed, prior = small_batch_plan(count, has_running, small_batch, min_count, prior_count,
                                        lambda: small_batch_message(input, min_count))
        if fixed:
            if on_fallback is not None and not compiling():
                on_fallback()
            return apply(input, weight, bias, residual, running_mean, running_var, False, 0.0, eps, activation,
                          negative_slope, None, None, None, momentum)[0]
        if prior > 0:  # the blend reads the running statistics, which the op updates: give it a copy
            prior_mean, prior_var = running_mean.detach().clone(), running_var.detach().clone()
    else:
        prior = 0.0
    update = training and has_running and count >= 2
    output, updated = apply(input, weight, bias, residual, prior_mean, prior_var, True, prior, eps, activation,
                             negative_slope, running_mean if update else None, running_var if update else None,
                             num_batches_tracked if update else None, momentum)
    if update:
        warn_if_not_updated(updated)
    return output


def update_running_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                         batch_mean: Tensor, batch_m2: Tensor, count: int, momentum: Optional[float]) -> None:
    """The running-statistics update from given batch moments (skipped, with a warning, for a non-finite batch)."""
    warn_if_not_updated(ops.update_running_stats(running_mean, running_var, num_batches_tracked, batch_mean, batch_m2,
                                                 count, momentum))


def warn_if_not_updated(updated: Tensor) -> None:
    """The non-finite guard's warning. It reads a flag on the host: on CUDA that would synchronise every layer of every
    step, so there the guard (applied on the device) is silent, and so it is in graphs (torch.compile, jit.trace)."""
    if updated.is_cpu and not (compiling() or torch.jit.is_tracing()) and not updated.item():
        warnings.warn("fusedbn: the batch mean or variance is not finite (NaN or Inf in the input); running "
                      "statistics and num_batches_tracked were left unchanged for this batch", RuntimeWarning,
                      stacklevel=4)


def _apply(*args):
    """(output, updated). The ops are differentiable themselves (a C++ autograd node, csrc/batch_norm/autograd/);
    FusedBatchNormFunction is taken only where forward-mode AD or a torch.func transform needs its jvp or vmap rule
    (outside torch.compile and torch.jit.trace, which record the ops)."""
    if (forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()) \
            and not (torch.jit.is_tracing() or compiling()):
        output, _, _, _, _, updated = FusedBatchNormFunction.apply(*args)
    else:
        output, _, _, _, _, updated = _forward(*args)
    return output, updated


def _empty_batch(input, weight, bias, residual, activation, negative_slope, training, num_batches_tracked):
    """N = 0 (or an empty spatial size): an empty output connected to the graph, as nn.BatchNorm2d returns.

    Running statistics are untouched; num_batches_tracked counts the batch, as nn.BatchNorm2d counts it.
    """
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    out = input.clone()
    if weight is not None:
        out = out * weight[0].to(input.dtype)
    if bias is not None:
        out = out + bias[0].to(input.dtype)
    if residual is not None:
        out = out + residual
    return activation_fn(activation, out, negative_slope)


def fused_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                     momentum: float = 0.1, eps: float = 1e-5, *, activation: str = "identity",
                     negative_slope: float = 0.01, residual: Optional[Tensor] = None, small_batch: str = "running",
                     min_count: int = 2, prior_count: float = 16.0) -> Tensor:
    """Batch norm over (N, H, W) of a 4-D input, then ``activation(y + residual)``; as F.batch_norm.

    Same argument order and meaning as ``torch.nn.functional.batch_norm``: batch statistics are used when
    ``training`` or when the running buffers are None, and ``running_mean``/``running_var`` are updated in
    place when training, with the unbiased batch variance: running = (1 − momentum)·running + momentum·batch.

    Differences from F.batch_norm:

    * ``activation`` ("identity", "relu", "leaky_relu" with ``negative_slope``, "silu") and ``residual``
      (y = act(BN(x) + residual)) are fused into the same passes over memory.
    * Small batches: when a channel has fewer than ``min_count`` values (N·H·W) in training,
      ``small_batch="running"`` normalises with the running statistics (as in eval mode; buffers untouched),
      ``"blend"`` merges the batch statistics with ``prior_count`` pseudo-samples at the running statistics,
      and ``"error"`` raises PyTorch's ValueError. Running statistics are never updated from fewer than 2
      values (never NaN).
    * Non-finite guard: a batch whose mean or variance is NaN/Inf leaves the running statistics unchanged
      (with a warning); the output is what the math gives.
    """
    check_options(eps, momentum, activation, negative_slope, small_batch, min_count, prior_count)
    return batch_norm(input, running_mean, running_var, None, weight, bias, bool(training), float(momentum),
                      float(eps), activation, float(negative_slope), residual, small_batch, int(min_count),
                      float(prior_count))
