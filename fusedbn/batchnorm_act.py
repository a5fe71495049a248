"""BatchNormAct2d: timm's BatchNormAct2d constructor and state_dict, with the activation fused."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .modules import FusedBatchNorm2d

# Activation modules (and timm's names for them) that the kernels fuse.
_FUSED_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}
_FUSED_NAMES = {"relu": "relu", "leaky_relu": "leaky_relu", "silu": "silu", "swish": "silu"}


def _resolve_act_layer(act_layer):
    """(fused activation name or None, act_layer as a module class or None)."""
    if act_layer is None:
        return None, None
    if isinstance(act_layer, str):
        if act_layer in _FUSED_NAMES:
            return _FUSED_NAMES[act_layer], None
        try:
            from timm.layers import get_act_layer
        except ImportError:
            raise ValueError(f"act_layer {act_layer!r}: fusedbn fuses {sorted(_FUSED_NAMES)}; other names "
                             f"need timm installed (or pass a module class)") from None
        act_layer = get_act_layer(act_layer)
    return _FUSED_MODULES.get(act_layer), act_layer


class BatchNormAct2d(FusedBatchNorm2d):
    """Batch norm followed by an activation, with timm's ``BatchNormAct2d`` constructor and ``state_dict``.

    timm users can pass it as ``norm_layer``. ReLU, LeakyReLU and SiLU (as classes or timm names) run fused
    in the batch norm's pass; any other ``act_layer`` is instantiated and run after batch norm, as timm does.
    ``drop_layer`` (if given) runs between batch norm and the activation, which then cannot be fused.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace: bool = True, drop_layer=None, device=None, dtype=None, **fusedbn_kwargs) -> None:
        act_kwargs = dict(act_kwargs or {})
        fused_name, act_cls = _resolve_act_layer(act_layer if apply_act else None)
        can_fuse = fused_name is not None and drop_layer is None
        activation, slope = "identity", 0.01
        if can_fuse:
            activation = fused_name
            slope = float(act_kwargs.get("negative_slope", 0.01))
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         activation=activation, negative_slope=slope, **fusedbn_kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        if can_fuse or (act_cls is None and fused_name is None):
            self.act = nn.Identity()
        else:
            act_cls = act_cls or {v: k for k, v in _FUSED_MODULES.items()}[fused_name]
            try:
                self.act = act_cls(**{"inplace": inplace, **act_kwargs})
            except TypeError:  # an activation without an inplace argument
                self.act = act_cls(**act_kwargs)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self.act(self.drop(super().forward(input, residual)))
