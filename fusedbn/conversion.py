"""Model conversion: nn.BatchNorm2d → FusedBatchNorm2d, and conv-BN folding for inference."""

from __future__ import annotations

import torch
from torch import nn

from .modules import FusedBatchNorm2d, leave_unknown_subclass
from .timm_layers import fused_copy, timm_batchnorm_act


def _converted(module: nn.Module, fusedbn_kwargs: dict):
    """The fusedbn replacement of a batch norm layer (or the layer itself), or None for any other module."""
    if isinstance(module, FusedBatchNorm2d):
        return module
    if type(module) is nn.BatchNorm2d:
        return FusedBatchNorm2d.from_batch_norm(module, **fusedbn_kwargs)
    if type(module) is timm_batchnorm_act():
        return fused_copy(module, **fusedbn_kwargs)
    if isinstance(module, nn.BatchNorm2d):
        return leave_unknown_subclass(module)
    return None


def convert_model(module: nn.Module, sync: bool = False, process_group=None, **fusedbn_kwargs) -> nn.Module:
    """Returns ``module`` with every ``nn.BatchNorm2d`` replaced by a ``FusedBatchNorm2d``.

    The new modules share the old ones' parameters and buffers and keep their training flag, device and
    dtype; ``state_dict`` keys are unchanged, so checkpoints load before or after conversion.
    ``fusedbn_kwargs`` (activation, small_batch, min_count, prior_count, ...) go to every new module.
    timm's ``BatchNormAct2d`` is converted with its activation and drop layer (and stays a timm BatchNormAct2d to
    timm's tools); any other subclass of nn.BatchNorm2d is left unchanged, with a warning, so that converting never
    changes what a model computes. With ``sync=True`` the replacement is ``SyncFusedBatchNorm2d`` (statistics
    synchronised over ``process_group``), and ``nn.SyncBatchNorm`` and ``FusedBatchNorm2d`` layers are converted too.
    """
    if sync:
        from .sync import SyncFusedBatchNorm2d

        return SyncFusedBatchNorm2d.convert_sync_batchnorm(module, process_group, **fusedbn_kwargs)
    converted = _converted(module, fusedbn_kwargs)
    if converted is not None:
        return converted
    for name, child in module.named_children():
        converted = convert_model(child, **fusedbn_kwargs)
        if converted is not child:
            setattr(module, name, converted)
    return module


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """Folds an eval-mode batch norm (nn's or fusedbn's) into the preceding convolution, for inference.

    conv(x)·γ/sqrt(var + eps) + (β − mean·γ/sqrt(var + eps)) = conv'(x) with
    W' = W·γ/sqrt(var + eps) per output channel and b' = (b − mean)·γ/sqrt(var + eps) + β. Computed in
    float64, stored in the conv's dtype.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"bn must be a batch norm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("fuse_conv_bn folds an eval-mode batch norm: call bn.eval() first")
    if bn.running_mean is None:
        raise ValueError("fuse_conv_bn needs running statistics (track_running_stats=True)")
    if getattr(bn, "activation", "identity") != "identity":
        raise ValueError(f"cannot fold a batch norm with a fused activation ({bn.activation!r}) into a conv")
    if conv.out_channels != bn.num_features:
        raise ValueError(f"conv.out_channels ({conv.out_channels}) must equal bn.num_features ({bn.num_features})")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
    conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    fused.bias.copy_((conv_bias - bn.running_mean.double()) * scale + shift)
    fused.train(conv.training)
    return fused
