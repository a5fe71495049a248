"""timm's BatchNormAct2d, converted by convert_model with its whole behaviour.

The converted layer is an instance of a class derived from both fusedbn's BatchNormAct2d and timm's class, made on
first use (timm is never imported by fusedbn itself): timm's own tools (freeze_batch_norm_2d,
convert_sync_batchnorm, ...) still recognise it and keep its ``act`` and ``drop``, and its state_dict and
submodules are timm's.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .batchnorm_act import BatchNormAct2d, fused_activation
from .function import check_options

_FUSED_NAME = "FusedTimmBatchNormAct2d"
_classes: dict = {}


def timm_batchnorm_act() -> Optional[type]:
    """timm's BatchNormAct2d class where timm is already imported (a model of it exists), else None."""
    module = sys.modules.get("timm.layers.norm_act")
    return getattr(module, "BatchNormAct2d", None)


def _fused_class(timm_class: type) -> type:
    cls = _classes.get(timm_class)
    if cls is None:
        doc = "timm's BatchNormAct2d run by fusedbn (fusedbn.convert_model); see fusedbn.BatchNormAct2d."
        cls = type(_FUSED_NAME, (BatchNormAct2d, timm_class), {"__module__": __name__, "__doc__": doc})
        _classes[timm_class] = cls
    return cls


def __getattr__(name: str):
    # Unpickling a converted model (torch.save of the whole module) looks the class up here.
    if name == _FUSED_NAME:
        from timm.layers.norm_act import BatchNormAct2d as timm_class

        return _fused_class(timm_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_copy(module: nn.Module, small_batch: str = "running", min_count: int = 2, prior_count: float = 16.0,
               **activation) -> nn.Module:
    """A fusedbn layer with module's attributes, submodules, parameters and buffers (the same tensor objects)."""
    if activation:
        raise ValueError(f"convert_model: {sorted(activation)} cannot apply to timm's BatchNormAct2d, which keeps "
                         f"its own activation ({type(module.act).__name__})")
    check_options(module.eps, module.momentum, "identity", 0.01, small_batch, min_count, prior_count,
                  momentum_may_be_none=True)
    cls = _fused_class(type(module))
    new = cls.__new__(cls)
    # nn.Module keeps parameters, buffers, submodules and hooks in dicts: copy the dicts, share what they hold.
    new.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    activation, slope = fused_activation(module.act, module.drop) or ("identity", 0.01)
    new._set_options(activation, slope, small_batch, min_count, prior_count)
    return new
