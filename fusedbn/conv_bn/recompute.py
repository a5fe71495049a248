"""What a conv-BN block stores for its backward pass, and how a dropped tensor is rebuilt.

Policies (``recompute=``), for a block y = conv(x), out = act(BN(y) [+ r]):

* ``"none"``: what nn stores: x and y (and the output, where the next layer saves it).
* ``"output"``: x and y, and the block's output is rebuilt on demand: a later fused block that saves it as its conv
  input stores a *recipe* instead (y and the per-channel statistics, which this block stores anyway), and rebuilds
  it in its backward with ``fusedbn::renormalize``: the same kernel on the same inputs, so the same bits. Only the
  output of a block without a residual gets a recipe, so rebuilding never needs another rebuilt tensor, and an
  output changed in place since the block made it (its version counter moved) is stored as it is.
* ``"conv"``: x only; y is recomputed by the conv in the backward (the PyTorch tutorial's way).
* ``"auto"``: per block, ``auto_policy`` (fuse_conv_bn_blocks decides it once per block, from the model's graph).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops

POLICIES = ("none", "output", "conv", "auto")
_RECIPE_ATTRIBUTE = "_fusedbn_recipe"


def check_policy(recompute: str) -> None:
    if recompute not in POLICIES:
        raise ValueError(f"recompute must be one of {', '.join(map(repr, POLICIES))}, got {recompute!r}")


# Multiply-adds per output element ((in_channels / groups)·kH·kW) up to which running a conv again in the backward
# pass costs less than keeping its output: bench/memory.py measured the policies on ResNet-style networks.
CHEAP_CONV_MACS = 256


def cheap_to_recompute(conv_weight: Tensor) -> bool:
    return conv_weight.shape[1] * conv_weight.shape[2] * conv_weight.shape[3] <= CHEAP_CONV_MACS


def derivative_from_output(activation: str, negative_slope: float) -> bool:
    """Whether act'(pre) can be read from the output act(pre) (relu, relu6, leaky_relu with a positive slope: the
    output has the sign of pre and saturates where pre does). A block with a residual then keeps its output, which the
    next layer keeps anyway, instead of the residual, which it would otherwise need to form pre = BN(y) + r."""
    return activation in ("relu", "relu6") or (activation == "leaky_relu" and negative_slope > 0)


def masked_by_output(grad_output: Tensor, output: Tensor, activation: str, negative_slope: float) -> Tensor:
    """grad_output·act'(pre) from the output (derivative_from_output), by aten's own backward of the activation, which
    reads the result as torch's in-place activations do: one pass, differentiable in grad_output."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_output, output, 0)
    if activation == "relu6":
        return torch.ops.aten.hardtanh_backward(grad_output, output, 0.0, 6.0)
    return torch.ops.aten.leaky_relu_backward(grad_output, output, negative_slope, True)


def auto_policy(conv_weight: Tensor, has_residual: bool, recipe_used: bool = True) -> str:
    """The policy "auto" picks for one block (README, "Conv-BN blocks").

    A block whose output the next blocks save as a recipe stores its conv output y for that ("output"). Where no
    recipe is used (the block adds a residual, so whoever saves its output stores it; or fuse_conv_bn_blocks saw that
    the output goes to another kind of layer, or to blocks that do not save it: ``recipe_used=False``), y is only
    needed by the block itself, and it recomputes its conv in the backward ("conv") when that conv is cheap
    (cheap_to_recompute), storing y otherwise.
    """
    if not has_residual and recipe_used:
        return "output"
    return "conv" if cheap_to_recompute(conv_weight) else "output"


class Recipe:
    """How to rebuild a block's output: renormalize(conv_output, weight, bias, mean, invstd, activation).

    Attached to the output tensor while the producing block's graph lives (the block drops the conv output from it
    in its backward, after which nothing can use the recipe)."""

    __slots__ = ("conv_output", "weight", "bias", "mean", "invstd", "activation", "negative_slope", "version")

    def __init__(self, conv_output, weight, bias, mean, invstd, activation, negative_slope):
        self.conv_output, self.weight, self.bias = conv_output, weight, bias
        self.mean, self.invstd = mean, invstd
        self.activation, self.negative_slope = activation, negative_slope
        self.version = -1

    def attach(self, output: Tensor) -> None:
        self.version = output._version
        setattr(output, _RECIPE_ATTRIBUTE, self)

    def release(self) -> None:
        self.conv_output = None


def _usable_recipe(t: Tensor) -> Optional[Recipe]:
    recipe = getattr(t, _RECIPE_ATTRIBUTE, None)
    if recipe is None or recipe.conv_output is None or t._version != recipe.version:
        return None
    return recipe


class SavedTensors:
    """The tensors a block saves with ctx.save_for_backward, where an activation may be saved as its recipe.

    ``add`` returns a slot; after ``ctx.save_for_backward(*saved.tensors)``, ``restore(slot, ctx.saved_tensors)``
    gives the tensor back (rebuilding it from its recipe). Saving the recipe's tensors through save_for_backward
    keeps autograd's checks (a parameter changed in place before the backward is an error) and lets
    saved_tensors_hooks see them; they are the producer's own saved tensors, so they cost no memory.
    """

    def __init__(self) -> None:
        self.tensors: List[Optional[Tensor]] = []

    def add(self, t: Optional[Tensor], may_rebuild: bool = False):
        recipe = _usable_recipe(t) if may_rebuild and t is not None else None
        start = len(self.tensors)
        if recipe is None:
            self.tensors.append(t)
            return start
        self.tensors += [recipe.conv_output, recipe.weight, recipe.bias, recipe.mean, recipe.invstd]
        return start, recipe.activation, recipe.negative_slope

    @staticmethod
    def is_rebuilt(slot) -> bool:
        return isinstance(slot, tuple)

    @staticmethod
    def restore(slot, saved: Tuple[Optional[Tensor], ...]) -> Optional[Tensor]:
        if not isinstance(slot, tuple):
            return saved[slot]
        start, activation, negative_slope = slot
        conv_output, weight, bias, mean, invstd = saved[start:start + 5]
        with torch.no_grad():
            return ops.renormalize(conv_output, weight, bias, None, mean, invstd, activation, negative_slope)
