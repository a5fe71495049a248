"""The convolution of a conv-BN block: its options, checked as nn.Conv2d checks them, and the eval-mode folding of
the batch norm into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntPair = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class ConvOptions:
    """stride, padding, dilation (pairs) and groups of a 2-D convolution; padding is symmetric here (a string
    padding, or an asymmetric "same", is resolved by ``resolve`` into a pre-pad of the input plus this)."""

    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1

    def convolution(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """at::convolution (oneDNN on the CPU, cuDNN on the GPU), differentiable where autograd is on."""
        return torch.convolution(input, weight, bias, self.stride, self.padding, self.dilation, False, (0, 0),
                                 self.groups)

    def convolution_with_activation(self, input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                                    negative_slope: float) -> Optional[Tensor]:
        """act(conv(x)) as one oneDNN call with the activation as a post-op (the op torch.compile's CPU backend uses),
        where that exists: CPU, float32 or bfloat16, no autograd, and an activation it computes exactly as torch
        does (relu, relu6: bit for bit). None elsewhere (and for the identity, where there is nothing to fuse)."""
        post_op = _ONEDNN_POST_OPS.get(activation)
        if post_op is None or _POINTWISE is None or input.device.type != "cpu" \
                or input.dtype not in (torch.float32, torch.bfloat16):
            return None
        attr, scalars = post_op(negative_slope)
        return _POINTWISE(input, weight, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                          attr, scalars, "")

    def weight_and_input_gradients(self, grad_output: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                                   needs: Tuple[bool, bool, bool]) -> tuple:
        """(grad_input, grad_weight, grad_bias) of the convolution, None where ``needs`` says not needed."""
        bias_sizes = [weight.shape[0]] if has_bias else None
        grads = torch.ops.aten.convolution_backward(grad_output, input, weight, bias_sizes, list(self.stride),
                                                    list(self.padding), list(self.dilation), False, [0, 0],
                                                    self.groups, [needs[0], needs[1], needs[2] and has_bias])
        return tuple(g if need else None for g, need in zip(grads, needs))


_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_POST_OPS = {"relu": lambda slope: ("relu", []),
                    "relu6": lambda slope: ("hardtanh", [0.0, 6.0])}


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def resolve(input: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], stride: IntPair,
            padding: Union[str, IntPair], dilation: IntPair, groups: int) -> Tuple[Tensor, ConvOptions]:
    """Checks a convolution's arguments (raising ValueError/TypeError that name the argument, before anything is
    computed) and returns (input, options) with a string padding resolved as nn.Conv2d resolves it: "valid" is 0;
    "same" pads dilation·(k − 1) in total, half on each side and the odd one on the right (bottom), which is done
    here by padding the input."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim() if isinstance(input, Tensor) else type(input).__name__}"
                         f"{'D' if isinstance(input, Tensor) else ''} input)")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("conv_weight must be a 4-D tensor (out_channels, in_channels/groups, kH, kW)")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    out_channels, in_per_group = conv_weight.shape[:2]
    if input.shape[1] != in_per_group * groups:
        raise ValueError(f"input has {input.shape[1]} channels, but conv_weight {tuple(conv_weight.shape)} with "
                         f"groups={groups} expects {in_per_group * groups}")
    if out_channels % groups:
        raise ValueError(f"conv_weight's out_channels ({out_channels}) must be divisible by groups ({groups})")
    if conv_weight.dtype != input.dtype or conv_weight.device != input.device:
        raise TypeError(f"conv_weight must have the input's dtype and device ({input.dtype}, {input.device}), got "
                        f"{conv_weight.dtype}, {conv_weight.device}")
    if conv_bias is not None and (conv_bias.shape != (out_channels,) or conv_bias.dtype != input.dtype
                                  or conv_bias.device != input.device):
        raise ValueError(f"conv_bias must be None or a tensor of shape ({out_channels},) with the input's dtype and "
                         f"device, got {tuple(conv_bias.shape)}, {conv_bias.dtype}, {conv_bias.device}")
    if isinstance(padding, str):
        if padding == "valid":
            return input, ConvOptions(stride, (0, 0), dilation, groups)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        totals = [d * (k - 1) for d, k in zip(dilation, conv_weight.shape[2:])]
        extra_h, extra_w = (t % 2 for t in totals)
        if extra_h or extra_w:
            input = F.pad(input, (0, extra_w, 0, extra_h))
        return input, ConvOptions(stride, (totals[0] // 2, totals[1] // 2), dilation, groups)
    return input, ConvOptions(stride, _pair(padding, "padding", 0), dilation, groups)


def folded_weight_and_bias(conv_weight: Tensor, conv_bias: Optional[Tensor], running_mean: Tensor,
                           running_var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float) -> Tuple[Tensor, Tensor]:
    """The eval-mode batch norm folded into the conv: BN(conv(x)) = conv'(x) with, per output channel,
    s = γ/sqrt(var + eps), W' = W·s and b' = (b − mean)·s + β. In torch operations (differentiable in the conv's and
    the batch norm's parameters), computed in the statistics' precision and stored in the conv's dtype."""
    compute = torch.promote_types(running_var.dtype, conv_weight.dtype)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    shift = -running_mean.to(compute) if conv_bias is None else conv_bias.to(compute) - running_mean.to(compute)
    shift = shift * scale
    if bias is not None:
        shift = shift + bias.to(compute)
    dtype = conv_weight.dtype
    return (conv_weight.to(compute) * scale.view(-1, 1, 1, 1)).to(dtype), shift.to(dtype)
