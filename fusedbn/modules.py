"""FusedBatchNorm2d: a drop-in replacement for torch.nn.BatchNorm2d."""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .function import batch_norm, check_options

# torch releases whose batch norm takes bias= (nn.BatchNorm2d(..., *, bias=True)); on others fusedbn adds it.
_NN_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


def leave_unknown_subclass(module: nn.Module) -> nn.Module:
    """What the conversions do with a subclass of nn.BatchNorm2d they do not know: leave it, and say so."""
    warnings.warn(f"fusedbn: {type(module).__module__}.{type(module).__qualname__} subclasses nn.BatchNorm2d but "
                  f"fusedbn does not know what it adds; it is left unchanged", UserWarning, stacklevel=3)
    return module


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with fused statistics, normalisation, activation and residual add.

    Same constructor (plus keyword-only options), parameters, buffers, ``state_dict`` (``_version = 2``),
    ``reset_parameters``/``reset_running_stats``, repr and numbers as nn.BatchNorm2d wherever nn.BatchNorm2d
    works; checkpoints load both ways. A subclass of nn.BatchNorm2d, so that code that looks for batch norm
    layers (freezing, weight-decay groups, sync conversion) finds it. Options are checked here, at construction.

    Differences from nn.BatchNorm2d:

    * ``activation`` and ``negative_slope``: y = act(BN(x) [+ residual]) in the same pass; ``forward``
      takes an optional ``residual`` of the input's shape.
    * ``small_batch``/``min_count``/``prior_count``: what training does when a channel has fewer than
      ``min_count`` values (N·H·W), where nn.BatchNorm2d raises at 1 value: "running" (default) normalises
      with the running statistics and warns once, "blend" merges the batch statistics with ``prior_count``
      pseudo-samples at the running statistics, "error" raises as nn does. See ``fused_batch_norm``.
    * A bad input (wrong rank, channel count, dtype, device) raises before any buffer changes; a batch with a
      non-finite mean or variance leaves the running statistics and ``num_batches_tracked`` unchanged.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str = "identity", negative_slope: float = 0.01, small_batch: str = "running",
                 min_count: int = 2, prior_count: float = 16.0) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        check_options(eps, momentum, activation, negative_slope, small_batch, min_count, prior_count,
                      momentum_may_be_none=True)
        if _NN_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if not bias:
                self.register_parameter("bias", None)
        self._set_options(activation, negative_slope, small_batch, min_count, prior_count)

    def _set_options(self, activation: str, negative_slope: float, small_batch: str, min_count: int,
                     prior_count: float) -> None:
        """fusedbn's own options, already checked."""
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.small_batch = small_batch
        self.min_count = min_count
        self.prior_count = float(prior_count)
        self._warned_small_batch = False

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm, **options) -> "FusedBatchNorm2d":
        """A module of this class that shares bn's parameters and buffers (the same tensor objects: optimisers and
        checkpoints keep working) and has its options, training flag, device and dtype; ``options`` are fusedbn's
        (activation, small_batch, ...)."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None,
                  bias=bn.bias is not None or not bn.affine, **options)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first. The module's Python layer (small-batch policy, checks, torch.func
        # support) is not TorchScript, and TorchScript is deprecated from torch 2.13 on: say so, and what works.
        raise RuntimeError("fusedbn: torch.jit.script is not supported (TorchScript is deprecated upstream); "
                           "torch.jit.trace records fusedbn's ops (differentiable, saved with the model), and "
                           "torch.compile and torch.export work")

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels (num_features), "
                             f"got {input.shape[1]} (input shape {tuple(input.shape)})")

    def _warn_small_batch(self) -> None:
        if not self._warned_small_batch:
            self._warned_small_batch = True
            warnings.warn(
                f"fusedbn: fewer than min_count={self.min_count} values per channel in training; normalising "
                f"with the running statistics (small_batch='running'). Running statistics are not updated "
                f"from such batches.", UserWarning, stacklevel=4)

    def _call_state(self) -> tuple:
        """(weight, bias, running_mean, running_var, num_batches_tracked, batch_statistics) for a call in the current
        mode, as nn.BatchNorm2d decides them: in training without tracking, the buffers are neither used nor updated;
        num_batches_tracked only where training updates it; batch statistics in training or without buffers.

        Parameters and buffers are read from the module's dicts: through nn.Module.__getattr__ each read costs about
        1 µs, a fifth of the op on a small tensor. Where something else provides one of them (a parametrization, a
        wrapper that replaced a parameter), all are read as attributes."""
        params, buffers = self._parameters, self._buffers
        try:
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            num_batches_tracked = buffers["num_batches_tracked"]
        except KeyError:
            weight, bias, running_mean, running_var, num_batches_tracked = (
                self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked)
        training = self.training
        if training and not self.track_running_stats:
            return weight, bias, None, None, None, True
        return (weight, bias, running_mean, running_var, num_batches_tracked if training else None,
                training or running_mean is None)

    def statistics_for_call(self) -> tuple:
        """(running_mean, running_var, num_batches_tracked, batch_statistics) of ``_call_state``."""
        return self._call_state()[2:]

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, num_batches_tracked, batch_statistics = self._call_state()
        return batch_norm(input, running_mean, running_var, num_batches_tracked, weight, bias, batch_statistics,
                          self.momentum, self.eps, self.activation, self.negative_slope, residual, self.small_batch,
                          self.min_count, self.prior_count, on_fallback=self._warn_small_batch)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._options_repr(with_activation=True)

    def _options_repr(self, with_activation: bool) -> str:
        """fusedbn's options where they differ from their defaults (nn's repr otherwise)."""
        s = ""
        if with_activation and self.activation != "identity":
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        if (self.small_batch, self.min_count, self.prior_count) != ("running", 2, 16.0):
            s += f", small_batch={self.small_batch!r}, min_count={self.min_count}, prior_count={self.prior_count}"
        return s
