"""BatchNormAct2d: timm's BatchNormAct2d constructor, structure and state_dict, with the activation fused."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .modules import FusedBatchNorm2d
from .reference import ACTIVATION_MODULES

# Activation modules (and timm's names for them) that the kernels fuse.
FUSED_MODULES = {module: name for name, module in ACTIVATION_MODULES.items()}
_FUSED_NAMES = {**ACTIVATION_MODULES, "swish": nn.SiLU}


def fused_activation(act: nn.Module, drop: nn.Module) -> Optional[tuple]:
    """(activation name, negative_slope) when act(drop(y)) can run inside the batch norm's pass, else None."""
    name = FUSED_MODULES.get(type(act))
    if name is None or type(drop) is not nn.Identity or getattr(act, "approximate", "none") != "none":
        return None  # (the kernels fuse the exact GELU, not its tanh approximation)
    return name, float(getattr(act, "negative_slope", 0.01))


def _make_act(act_layer, act_kwargs: dict, inplace: bool) -> nn.Module:
    """The activation module timm's BatchNormAct2d would hold (Identity for none)."""
    if act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, str):
        if act_layer in _FUSED_NAMES:
            act_layer = _FUSED_NAMES[act_layer]
        else:
            try:
                from timm.layers import get_act_layer
            except ImportError:
                raise ValueError(f"act_layer {act_layer!r}: fusedbn knows {sorted(_FUSED_NAMES)}; other names need "
                                 f"timm installed (or pass a module class)") from None
            act_layer = get_act_layer(act_layer)
    try:
        return act_layer(**{"inplace": inplace, **act_kwargs})
    except TypeError:  # an activation without an inplace argument
        return act_layer(**act_kwargs)


class BatchNormAct2d(FusedBatchNorm2d):
    """Batch norm followed by an activation, with timm's ``BatchNormAct2d`` constructor, submodules (``drop``,
    ``act``) and ``state_dict``.

    ``act`` holds the activation module, as in timm. When it is a ReLU, LeakyReLU or SiLU and there is no
    ``drop_layer``, it runs fused in the batch norm's pass (``activation`` says which); any other activation runs
    after batch norm, as timm does. Decided at construction: replace ``act`` by constructing a new module.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace: bool = True, drop_layer=None, device=None, dtype=None, **fusedbn_kwargs) -> None:
        act = _make_act(act_layer if apply_act else None, dict(act_kwargs or {}), inplace)
        drop = drop_layer() if drop_layer is not None else nn.Identity()
        activation, slope = fused_activation(act, drop) or ("identity", 0.01)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         activation=activation, negative_slope=slope, **fusedbn_kwargs)
        self.drop = drop
        self.act = act

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        output = super().forward(input, residual)
        return output if self.activation != "identity" else self.act(self.drop(output))

    def extra_repr(self) -> str:
        # The activation shows as the `act` submodule, as in timm.
        return nn.BatchNorm2d.extra_repr(self) + self._options_repr(with_activation=False)
