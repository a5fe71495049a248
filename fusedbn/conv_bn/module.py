"""FusedConvBatchNorm2d: an nn.Conv2d and its batch norm trained as one block."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..function import check_options, compiling
from ..modules import FusedBatchNorm2d
from .conv import ConvOptions, folded_weight_and_bias
from .function import conv_batch_norm, folded_forward
from .recompute import check_policy


class FusedConvBatchNorm2d(nn.Module):
    """act(BN(conv(x)) [+ residual]): nn.Conv2d's constructor, then FusedBatchNorm2d's options, then ``recompute``.

    Holds ``conv`` (an nn.Conv2d) and ``bn`` (a FusedBatchNorm2d), so its state_dict keys are those of timm's
    ConvNormAct (``conv.weight``, ``bn.weight``, ``bn.running_mean``, ...) and code that looks for conv or batch
    norm layers finds them. The batch norm's ``training`` flag decides the mode. In training, ``recompute`` says what
    is stored for the backward pass (same numbers whatever it is; recompute.py); in eval, the block is one conv with
    the batch norm folded into its weight and bias (cached until a parameter or statistic changes).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "identity", negative_slope: float = 0.01,
                 small_batch: str = "running", min_count: int = 2, prior_count: float = 16.0,
                 recompute: str = "auto") -> None:
        check_options(eps, momentum, activation, negative_slope, small_batch, min_count, prior_count,
                      momentum_may_be_none=True)
        check_policy(recompute)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        bn = FusedBatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                              activation=activation, negative_slope=negative_slope, small_batch=small_batch,
                              min_count=min_count, prior_count=prior_count)
        super().__init__()
        self._set_modules(conv, bn, recompute)

    def _set_modules(self, conv: nn.Conv2d, bn: FusedBatchNorm2d, recompute: str, registered: bool = True) -> None:
        if registered:
            self.conv, self.bn = conv, bn
        else:  # plain attributes: not submodules, so not in this module's state_dict, parameters or train()
            self.__dict__["conv"], self.__dict__["bn"] = conv, bn
        self.recompute = recompute
        self._fold_key, self._folded = None, None

    @classmethod
    def referring_to(cls, conv: nn.Conv2d, bn: FusedBatchNorm2d, recompute: str = "auto") -> "FusedConvBatchNorm2d":
        """A block that runs ``conv`` and ``bn`` (these module objects) without holding them as submodules: what
        fuse_conv_bn_blocks puts in a model, whose conv and batch norm stay where they are, so that the model's
        state_dict is unchanged. The batch norm's training flag decides the mode."""
        check_policy(recompute)
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._set_modules(conv, bn, recompute, registered=False)
        return block

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, activation: str = "identity",
                     negative_slope: float = 0.01, recompute: str = "auto") -> "FusedConvBatchNorm2d":
        """A block that shares conv's and bn's parameters and buffers (no copy). bn may be nn's or fusedbn's; a
        fusedbn bn keeps its small-batch options, and its activation unless ``activation`` names another."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be an nn.BatchNorm2d or a FusedBatchNorm2d, got {type(bn).__name__}")
        if conv.out_channels != bn.num_features:
            raise ValueError(f"conv.out_channels ({conv.out_channels}) must equal bn.num_features "
                             f"({bn.num_features})")
        check_policy(recompute)
        options = {}
        if isinstance(bn, FusedBatchNorm2d):
            options = dict(small_batch=bn.small_batch, min_count=bn.min_count, prior_count=bn.prior_count)
            if activation == "identity":
                activation, negative_slope = bn.activation, bn.negative_slope
        fused_bn = FusedBatchNorm2d.from_batch_norm(bn, activation=activation, negative_slope=negative_slope,
                                                    **options)
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._set_modules(conv, fused_bn, recompute)
        block.train(bn.training)
        return block

    def _fold_inputs(self) -> tuple:
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        key = (tensors, tuple(t._version if t is not None else None for t in tensors), bn.eps,
               torch.is_inference_mode_enabled())
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return tensors, key, needs_graph

    def _folded_weight_and_bias(self) -> tuple:
        """The eval-mode folding, computed again only when a tensor it reads changed (version counters) or where
        autograd needs the graph of the folding."""
        tensors, key, needs_graph = self._fold_inputs()
        if needs_graph:
            return folded_weight_and_bias(*tensors, self.bn.eps)
        if not _same_key(key, self._fold_key):
            self._folded = tuple(t.detach() for t in folded_weight_and_bias(*tensors, self.bn.eps))
            self._fold_key = key
        return self._folded

    def _eval_from_cache(self, input: Tensor) -> Optional[Tensor]:
        """The eval forward without a residual where the folding is cached and the input plainly fits (else None:
        the general path checks everything and fills the cache). Saves the checks' Python time on small convs."""
        conv, bn = self.conv, self.bn
        weight = conv.weight
        if bn.training or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or not bn.eps > 0 \
                or torch.is_autocast_enabled(input.device.type) \
                or input.dim() != 4 or input.shape[1] != conv.in_channels or input.dtype != weight.dtype \
                or input.device != weight.device:
            return None
        _, key, needs_graph = self._fold_inputs()
        if needs_graph or not _same_key(key, self._fold_key):
            return None
        options = ConvOptions(conv.stride, conv.padding, conv.dilation, conv.groups)
        return folded_forward(options, input, *self._folded, None, bn.activation, bn.negative_slope)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        graph = compiling() or torch.jit.is_tracing()  # the folding is recorded in the graph, not cached
        output = self._eval_from_cache(input) if residual is None and not graph else None
        if output is not None:
            return output
        conv, bn = self.conv, self.bn
        padding = conv.padding
        if conv.padding_mode != "zeros":
            input, padding = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        running_mean, running_var, num_batches_tracked, training = bn.statistics_for_call()
        return conv_batch_norm(
            input, conv.weight, conv.bias, running_mean, running_var, num_batches_tracked, bn.weight, bn.bias,
            training, bn.momentum, bn.eps, conv.stride, padding, conv.dilation, conv.groups, bn.activation,
            bn.negative_slope, residual, bn.small_batch, bn.min_count, bn.prior_count, self.recompute,
            on_fallback=bn._warn_small_batch, fold=None if graph else self._folded_weight_and_bias)

    def extra_repr(self) -> str:
        if "conv" in self._modules:
            return f"recompute={self.recompute!r}"
        return f"conv={self.conv!r}, bn={self.bn!r}, recompute={self.recompute!r}"


def _same_key(a, b) -> bool:
    """Cache keys compare tensors by identity (== on tensors is elementwise)."""
    return b is not None and all(x is y for x, y in zip(a[0], b[0])) and a[1:] == b[1:]
