"""fusedbn: a fused BatchNorm2d for PyTorch.

Identical to torch.nn.BatchNorm2d wherever that works; meaningful at batch size 1 (small-batch fallback),
stable in one pass (Welford/Chan statistics), with activation and residual add fused into its passes.
"""

from ._ops import cuda_available
from .function import FusedBatchNormFunction, fused_batch_norm
from .modules import FusedBatchNorm2d

__all__ = ["FusedBatchNorm2d", "FusedBatchNormFunction", "cuda_available", "fused_batch_norm"]
__version__ = "0.1.0"
