"""The conv-BN block's functional API and its autograd Function: out = act(BN(conv(x)) [+ residual]).

Layering: ``FusedConvBatchNorm2d`` (module.py) → ``fused_conv_batch_norm`` / ``conv_batch_norm`` (here: checks, the
eval-mode folding, the recompute policy) → ``function.batch_norm`` (the batch norm's checks and small-batch plan,
shared with FusedBatchNorm2d) → ``FusedConvBatchNormFunction`` → at::convolution and ``torch.ops.fusedbn.*``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .._ops import ops
from ..function import batch_norm, check_eps, check_options, compiling
from ..reference import activation_fn
from .conv import ConvOptions, folded_weight_and_bias, resolve
from .recompute import Recipe, SavedTensors, auto_policy, check_policy, derivative_from_output, masked_by_output


@dataclass(frozen=True)
class BlockOptions:
    """The non-tensor arguments of FusedConvBatchNormFunction. batch_stats: normalise with the batch's statistics
    (blended with prior_count pseudo-samples at stats_mean/stats_var when prior_count > 0), else with the given
    stats_mean/stats_var as constants. recompute: "none", "output" or "conv" (recompute.py)."""

    conv: ConvOptions
    batch_stats: bool
    prior_count: float
    eps: float
    activation: str
    negative_slope: float
    momentum: Optional[float]
    recompute: str


class FusedConvBatchNormFunction(torch.autograd.Function):
    """out = act(BN(conv(x)) [+ residual]), differentiable in x, the conv's weight and bias, the batch norm's weight and
    bias, and the residual; storing for backward what ``options.recompute`` says (recompute.py).

    ``apply(input, conv_weight, conv_bias, weight, bias, residual, stats_mean, stats_var, running_mean, running_var,
    num_batches_tracked, options, conv_output=None)`` returns (output, updated). With batch statistics,
    running_mean, running_var and num_batches_tracked (where given) are updated in place by ``options.momentum`` (None:
    cumulative average), once, skipped for a non-finite batch (``updated`` says whether they were); the backward never
    touches them, whatever it recomputes. ``conv_output`` is conv(input) where the caller has it already (computed
    without autograd). Under ``create_graph=True`` the backward is built from differentiable operations, so second
    derivatives exist (except through an input that was saved as a recipe: then it raises).
    """

    @staticmethod
    def forward(ctx, input, conv_weight, conv_bias, weight, bias, residual, stats_mean, stats_var, running_mean,
                running_var, num_batches_tracked, options: BlockOptions, conv_output=None):
        y = options.conv.convolution(input, conv_weight, conv_bias) if conv_output is None else conv_output
        act, slope = options.activation, options.negative_slope
        if options.batch_stats:
            output, mean, invstd, _, _, updated = ops.forward_train(
                y, weight, bias, residual, stats_mean, stats_var, options.prior_count, options.eps, act, slope,
                running_mean, running_var, num_batches_tracked, options.momentum)
            n, _, h, w = y.shape
            ctx.count = float(n * h * w) + options.prior_count
        else:
            output, mean, invstd = ops.normalize(y, weight, bias, residual, stats_mean, stats_var, options.eps, act,
                                                 slope)
            updated = mean.new_zeros((), dtype=torch.bool)
            ctx.count = None
        ctx.options, ctx.has_residual, ctx.has_conv_bias = options, residual is not None, conv_bias is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(updated)
        blended = options.batch_stats and options.prior_count > 0
        keeps_output = residual is not None and derivative_from_output(act, slope)
        saved = SavedTensors()
        ctx.slots = (saved.add(input, may_rebuild=True), saved.add(conv_weight), saved.add(conv_bias),
                     saved.add(None if options.recompute == "conv" else y), saved.add(weight), saved.add(bias),
                     saved.add(residual if act != "identity" and not keeps_output else None, may_rebuild=True),
                     saved.add(mean), saved.add(invstd), saved.add(stats_mean if blended else None),
                     saved.add(stats_var if blended else None), saved.add(output if keeps_output else None))
        ctx.save_for_backward(*saved.tensors)
        ctx.recipe = None
        if options.recompute == "output" and residual is None:
            ctx.recipe = Recipe(y, weight, bias, mean, invstd, act, slope)
            ctx.recipe.attach(output)
        return output, updated

    @staticmethod
    def backward(ctx, grad_output, _updated):
        if ctx.recipe is not None:
            ctx.recipe.release()  # the blocks after this one have run their backward: nothing rebuilds from it now
        if grad_output is None:
            return (None,) * 13
        options, saved = ctx.options, ctx.saved_tensors
        input, conv_weight, conv_bias, y, weight, bias, residual, mean, invstd, prior_mean, prior_var, output = (
            SavedTensors.restore(slot, saved) for slot in ctx.slots)
        activation = options.activation
        if output is not None:  # act'(pre) read from the output: the batch norm's backward starts after the activation
            grad_output = masked_by_output(grad_output, output, activation, options.negative_slope)
            activation = "identity"
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            if SavedTensors.is_rebuilt(ctx.slots[0]) or SavedTensors.is_rebuilt(ctx.slots[6]):
                raise RuntimeError("fusedbn: this conv-BN block's input was saved as a recipe (recompute='output' in "
                                   "the block before it), which has no graph to differentiate twice; use "
                                   "recompute='none' or 'conv' for double backward")
            grads = _differentiable_gradients(ctx, grad_output, activation, input, conv_weight, conv_bias, weight,
                                              bias, residual, mean, invstd, prior_mean, prior_var)
        else:
            if y is None:
                y = options.conv.convolution(input, conv_weight, conv_bias)
            grad_y, grad_residual, grad_weight, grad_bias = ops.backward(
                grad_output, y, residual, mean, invstd, weight, bias, ctx.count, activation, options.negative_slope)
            grads = options.conv.weight_and_input_gradients(grad_y, input, conv_weight, ctx.has_conv_bias,
                                                            needs[:3]) + (grad_weight, grad_bias, grad_residual)
        grad_residual = grads[5] if activation != "identity" else grad_output
        grads = grads[:5] + (grad_residual if ctx.has_residual else None,)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 7


def _differentiable_gradients(ctx, grad_output, activation, input, conv_weight, conv_bias, weight, bias, residual,
                              mean, invstd, prior_mean, prior_var) -> tuple:
    """The block's gradients in differentiable operations (create_graph=True): the conv run again under autograd, the
    batch norm's gradients by ``fusedbn::backward_composite``, and the conv's by autograd."""
    options, needs = ctx.options, ctx.needs_input_grad
    y = options.conv.convolution(input, conv_weight, conv_bias)
    grad_y, grad_weight, grad_bias, grad_residual = ops.backward_composite(
        grad_output, y, weight, bias, residual, mean, invstd, prior_mean, prior_var, options.batch_stats,
        options.prior_count, options.eps, activation, options.negative_slope)
    conv_inputs = [t for t, need in zip((input, conv_weight, conv_bias), needs[:3]) if need and t is not None]
    conv_grads = iter(torch.autograd.grad(y, conv_inputs, grad_y, create_graph=True) if conv_inputs else ())
    grads = tuple(next(conv_grads) if need and t is not None else None
                  for t, need in zip((input, conv_weight, conv_bias), needs[:3]))
    return grads + (grad_weight, grad_bias, grad_residual)


def _block_apply(input, conv_weight, conv_bias, conv: ConvOptions, recompute: str, conv_output, _bn_input, weight,
                 bias, residual, stats_mean, stats_var, batch_stats, prior_count, eps, activation, negative_slope,
                 running_mean, running_var, num_batches_tracked, momentum):
    """function.batch_norm's ``apply`` for a block: its planned normalisation, with the conv differentiated too."""
    options = BlockOptions(conv, batch_stats, prior_count, eps, activation, negative_slope, momentum, recompute)
    return FusedConvBatchNormFunction.apply(input, conv_weight, conv_bias, weight, bias, residual, stats_mean,
                                            stats_var, running_mean, running_var, num_batches_tracked, options,
                                            conv_output)


def folded_forward(conv: ConvOptions, input: Tensor, folded_weight: Tensor, folded_bias: Tensor,
                   residual: Optional[Tensor], activation: str, negative_slope: float) -> Tensor:
    """The eval block: the conv with the batch norm folded into its weight and bias, then the residual add and the
    activation. One oneDNN call with the activation as its post-op where that applies (no residual, nothing for
    autograd to record, not in a graph being recorded); else the add and the activation in place where autograd
    records nothing, and autograd's rules otherwise."""
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, folded_weight, folded_bias, residual))
    if residual is None and not grad and not (compiling() or torch.jit.is_tracing()):
        output = conv.convolution_with_activation(input, folded_weight, folded_bias, activation, negative_slope)
        if output is not None:
            return output
    output = conv.convolution(input, folded_weight, folded_bias)
    if residual is not None:
        output = output + residual if grad else output.add_(residual)
    return activation_fn(activation, output, negative_slope, inplace=not grad)


def _output_like(input: Tensor, conv_weight: Tensor, conv: ConvOptions) -> Tensor:
    """A stand-in with the conv output's shape, dtype and device (no memory): what the batch norm's checks read."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip(input.shape[2:], conv.padding, conv.dilation, conv_weight.shape[2:], conv.stride)]
    return input.new_empty(1).expand(input.shape[0], conv_weight.shape[0], *spatial)


def _transform_active() -> bool:
    """True where the block runs as plain differentiable operations (policy "none"): in graphs (torch.compile,
    jit.trace), which plan memory themselves, and under forward-mode AD and torch.func transforms."""
    return (compiling() or torch.jit.is_tracing() or forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active())


def conv_batch_norm(input: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], training: bool, momentum: Optional[float], eps: float, stride, padding,
                    dilation, groups: int, activation: str, negative_slope: float, residual: Optional[Tensor],
                    small_batch: str, min_count: int, prior_count: float, recompute: str,
                    on_fallback: Optional[Callable[[], None]] = None,
                    fold: Optional[Callable[[], tuple]] = None) -> Tensor:
    """The implementation behind fused_conv_batch_norm and the module; options are assumed valid (but not the
    tensors). ``fold()`` (optional) returns the eval-mode folded (weight, bias), e.g. from a cache."""
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        # autocast runs a conv in its lower precision: the block's conv too (torch.convolution is not on autocast's
        # list), and the batch norm takes that dtype (its parameters stay float32, as nn's do).
        dtype = torch.get_autocast_dtype(input.device.type)
        input, conv_weight = input.to(dtype), conv_weight.to(dtype)
        conv_bias = conv_bias.to(dtype) if conv_bias is not None else None
        residual = residual.to(dtype) if residual is not None else None
    input, conv = resolve(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    if not (training or running_mean is None):
        # Eval: the batch norm is an affine map, folded into the conv: no pass of its own over memory.
        ops.check_batch_norm(_output_like(input, conv_weight, conv), weight, bias, residual, running_mean, running_var,
                             eps, False)
        check_eps(eps, False)
        folded_weight, folded_bias = (t.to(conv_weight.dtype) for t in fold()) if fold is not None else \
            folded_weight_and_bias(conv_weight, conv_bias, running_mean, running_var, weight, bias, eps)
        return folded_forward(conv, input, folded_weight, folded_bias, residual, activation, negative_slope)
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, conv_weight, conv_bias, weight, bias, residual))
    policy = auto_policy(conv_weight, residual is not None) if recompute == "auto" else recompute
    bn_args = (running_mean, running_var, num_batches_tracked, weight, bias, training, momentum, eps, activation,
               negative_slope, residual, small_batch, min_count, prior_count, on_fallback)
    # Policy "none" runs as conv + FusedBatchNorm2d's ops, except where the block keeps its output rather than the
    # residual (recompute.derivative_from_output), which only the Function does.
    plain = policy == "none" and not (residual is not None and derivative_from_output(activation, negative_slope))
    if plain or not differentiable or _transform_active() or _output_like(input, conv_weight, conv).numel() == 0:
        return batch_norm(conv.convolution(input, conv_weight, conv_bias), *bn_args)
    with torch.no_grad():
        conv_output = conv.convolution(input, conv_weight, conv_bias)
    return batch_norm(conv_output, *bn_args,
                      apply=functools.partial(_block_apply, input, conv_weight, conv_bias, conv, policy, conv_output))


def fused_conv_batch_norm(input: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5, *, stride=1, padding=0, dilation=1,
                          groups: int = 1, activation: str = "identity", negative_slope: float = 0.01,
                          residual: Optional[Tensor] = None, small_batch: str = "running", min_count: int = 2,
                          prior_count: float = 16.0, recompute: str = "auto") -> Tensor:
    """act(BN(conv2d(input, conv_weight, conv_bias)) [+ residual]) as one block: F.conv2d's convolution arguments,
    then fused_batch_norm's batch norm arguments (same meaning; see there).

    Training (or no running statistics): batch statistics, the running statistics updated in place once; what is
    stored for the backward pass follows ``recompute`` ("none", "output", "conv", "auto"; fusedbn/conv_bn/recompute.py,
    README), and every choice gives the same numbers. Eval: one convolution with the batch norm folded into its
    weight and bias, then the residual add and the activation.
    """
    check_options(eps, momentum, activation, negative_slope, small_batch, min_count, prior_count)
    check_policy(recompute)
    return conv_batch_norm(input, conv_weight, conv_bias, running_mean, running_var, None, weight, bias,
                           bool(training), float(momentum), float(eps), stride, padding, dilation, groups, activation,
                           float(negative_slope), residual, small_batch, int(min_count), float(prior_count),
                           recompute)
