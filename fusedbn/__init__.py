"""fusedbn: a fused BatchNorm2d for PyTorch.

Identical to torch.nn.BatchNorm2d wherever that works; meaningful at batch size 1 (small-batch fallback),
stable in one pass (Welford/Chan statistics), with activation and residual add fused into its passes.
"""

from ._ops import cuda_available
from .batchnorm_act import BatchNormAct2d
from .conversion import convert_model, fuse_conv_bn
from .function import FusedBatchNormFunction, fused_batch_norm
from .fx_fusion import fuse_activations
from .modules import FusedBatchNorm2d
from .sync import SyncFusedBatchNorm2d

__all__ = ["BatchNormAct2d", "FusedBatchNorm2d", "FusedBatchNormFunction", "convert_model", "cuda_available",
           "fuse_activations", "fuse_conv_bn", "fused_batch_norm", "SyncFusedBatchNorm2d"]
__version__ = "0.1.0"
