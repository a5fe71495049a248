"""SyncFusedBatchNorm2d: batch statistics synchronised across the processes of a torch.distributed group.

Forward: each rank computes its local (count, mean, M2) with the kernels; one all_gather of 2·C + 1 values per
rank; every rank merges them with Chan's formula in rank order, so all ranks get the same statistics bit for bit.
Backward: one all_reduce of (Σg, Σg·(x − mean)), 2·C values. Works on CPU (gloo) and CUDA (NCCL).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._ops import ops
from .function import compiling, small_batch_message, small_batch_plan, update_running_stats
from .modules import FusedBatchNorm2d, leave_unknown_subclass
from .reference import blend_moments, chan_merge, stats_dtype


def _collective_error(what: str, group, error: Exception) -> RuntimeError:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return RuntimeError(f"fusedbn SyncFusedBatchNorm2d: {what} failed on rank {rank} of {world} "
                        f"(another rank may have failed, diverged or timed out): {error}")


def gather_moments(count: int, mean: Tensor, m2: Tensor, group) -> tuple:
    """(global count, mean, M2) of the union of every rank's batch: Chan merges in rank order."""
    local = torch.cat([mean.new_tensor([float(count)]), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, local, group=group)
    except Exception as e:  # noqa: BLE001  (report which collective and rank)
        raise _collective_error("all_gather of the batch statistics", group, e) from e
    c = mean.numel()
    n, g_mean, g_m2 = gathered[0][0], gathered[0][1:c + 1], gathered[0][c + 1:]
    for other in gathered[1:]:  # in rank order; ranks with no values change nothing
        n, g_mean, g_m2 = chan_merge(n, g_mean, g_m2, other[0], other[1:c + 1], other[c + 1:])
    return int(n.item()), g_mean, g_m2.clamp(min=0)


class SyncFusedBatchNormFunction(torch.autograd.Function):
    """FusedBatchNormFunction with statistics (and their gradient sums) synchronised over a process group.

    Normalises with (mean, var) — the global batch statistics, possibly blended — and, when ``count`` is
    not None, differentiates through them as statistics of ``count`` values spread over the group.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, var, count, eps, activation, negative_slope, group):
        output, save_mean, invstd = ops.normalize(input, weight, bias, residual, mean, var, eps, activation,
                                                  negative_slope)
        ctx.count, ctx.group = count, group
        ctx.activation, ctx.negative_slope, ctx.has_residual = activation, negative_slope, residual is not None
        ctx.save_for_backward(input, weight, bias, residual if activation != "identity" else None, save_mean,
                              invstd)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, mean, invstd = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        if ctx.count is None:  # constant statistics (small-batch "running" fallback): nothing to synchronise
            grad_input, grad_residual, grad_weight, grad_bias = ops.backward(
                grad_output, input, residual, mean, invstd, weight, bias, None, ctx.activation, ctx.negative_slope)
        else:
            # This rank's share of the weight and bias gradients (DDP averages them); the sums are all-reduced for
            # the input gradient.
            sum_dy, sum_dy_xmu, grad_weight = ops.backward_reduce(grad_output, input, residual, mean, invstd, weight,
                                                                  bias, ctx.activation, ctx.negative_slope)
            grad_bias = sum_dy
            total = torch.cat([sum_dy, sum_dy_xmu])
            try:
                dist.all_reduce(total, group=ctx.group)
            except Exception as e:  # noqa: BLE001
                raise _collective_error("all_reduce of the gradient sums", ctx.group, e) from e
            c = sum_dy.numel()
            grad_input, grad_residual = ops.backward_elemt(
                grad_output, input, residual, mean, invstd, weight, bias, total[:c], total[c:], ctx.count,
                ctx.activation, ctx.negative_slope)
        if ctx.has_residual and ctx.activation == "identity":
            grad_residual = grad_output
        needs = ctx.needs_input_grad
        grads = (grad_input, None if weight is None else grad_weight.to(weight.dtype),
                 None if bias is None else grad_bias.to(bias.dtype), grad_residual if ctx.has_residual else None)
        return tuple(g if need else None for g, need in zip(grads, needs[:4])) + (None,) * 7


class SyncFusedBatchNorm2d(FusedBatchNorm2d):
    """FusedBatchNorm2d whose training statistics are those of the union of every rank's batch.

    Equal to a single process running nn.BatchNorm2d on the concatenated batch (outputs, input gradients,
    running statistics); each rank's weight/bias gradients are its share, summing to the single-process ones
    (DDP averages them as usual). Uneven batches, including ranks with 0 or 1 samples, are fine; the
    small-batch fallback looks at the global count. World size 1, no initialised process group, and eval mode
    behave exactly as FusedBatchNorm2d and communicate nothing.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, activation: str = "identity", negative_slope: float = 0.01,
                 small_batch: str = "running", min_count: int = 2, prior_count: float = 16.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation, negative_slope=negative_slope, small_batch=small_batch,
                         min_count=min_count, prior_count=prior_count)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not self._synchronised():
            return super().forward(input, residual)
        self._check_input_dim(input)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        ops.check_batch_norm(input, self.weight, self.bias, residual, running_mean, running_var, self.eps, True)
        group = self.process_group or dist.group.WORLD
        n, _, h, w = input.shape
        local_count = n * h * w
        if local_count > 0:
            local_mean, local_m2 = ops.batch_stats(input)
        else:
            local_mean = local_m2 = torch.zeros(self.num_features, dtype=stats_dtype(input), device=input.device)
        count, mean, m2 = gather_moments(local_count, local_mean, local_m2, group)
        if count == 0:
            return super().forward(input, residual)  # nobody has values: nn's empty-batch behaviour
        has_running = running_mean is not None
        fixed, prior = small_batch_plan(
            count, has_running, self.small_batch, self.min_count, self.prior_count,
            lambda: small_batch_message(input, self.min_count).replace(
                "got input size", f"got {count} across {dist.get_world_size(group)} ranks; local input size"))
        if fixed:
            if not compiling():
                self._warn_small_batch()
            return SyncFusedBatchNormFunction.apply(
                input, self.weight, self.bias, residual, running_mean, running_var, None, self.eps,
                self.activation, self.negative_slope, group)
        norm_mean, norm_m2, norm_count = mean, m2, float(count)
        if prior > 0:
            norm_mean, norm_m2, norm_count = blend_moments(mean, m2, float(count), running_mean.to(mean.dtype),
                                                           running_var.to(mean.dtype), prior)
        norm_var = norm_m2 / norm_count
        output = SyncFusedBatchNormFunction.apply(
            input, self.weight, self.bias, residual, norm_mean, norm_var, norm_count, self.eps, self.activation,
            self.negative_slope, group)
        if has_running and count >= 2:
            tracked = self.num_batches_tracked if self.track_running_stats else None
            update_running_stats(running_mean, running_var, tracked, mean, m2, count, self.momentum)
        return output

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None, **fusedbn_kwargs) -> nn.Module:
        """Returns ``module`` with every nn.BatchNorm2d, nn.SyncBatchNorm and FusedBatchNorm2d replaced by a
        SyncFusedBatchNorm2d sharing its parameters and buffers (FusedBatchNorm2d's options are kept)."""
        if isinstance(module, cls):
            return module
        if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm, FusedBatchNorm2d):
            options = {}
            if isinstance(module, FusedBatchNorm2d):
                options = dict(activation=module.activation, negative_slope=module.negative_slope,
                               small_batch=module.small_batch, min_count=module.min_count,
                               prior_count=module.prior_count)
            options.update(fusedbn_kwargs)
            converted = cls.from_batch_norm(module, **options)
            converted.process_group = process_group
            return converted
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return leave_unknown_subclass(module)  # what it adds (an activation, a drop layer) would be lost
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group, **fusedbn_kwargs)
            if converted is not child:
                setattr(module, name, converted)
        return module
