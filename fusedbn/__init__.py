"""fusedbn: a fused BatchNorm2d for PyTorch.

Identical to torch.nn.BatchNorm2d wherever that works; meaningful at batch size 1 (small-batch fallback),
stable in one pass (Welford/Chan statistics), with activation and residual add fused into its passes.
"""

from ._ops import cuda_available
from .batchnorm_act import BatchNormAct2d
from .conv_bn import FusedConvBatchNorm2d, FusedConvBatchNormFunction, fused_conv_batch_norm
from .conversion import convert_model, fuse_conv_bn
from .function import FusedBatchNormFunction, fused_batch_norm
from .fx_fusion import fuse_activations, fuse_conv_bn_blocks
from .modules import FusedBatchNorm2d
from .sync import SyncFusedBatchNorm2d

__all__ = ["BatchNormAct2d", "FusedBatchNorm2d", "FusedBatchNormFunction", "FusedConvBatchNorm2d",
           "FusedConvBatchNormFunction", "convert_model", "cuda_available", "fuse_activations", "fuse_conv_bn",
           "fuse_conv_bn_blocks", "fused_batch_norm", "fused_conv_batch_norm", "SyncFusedBatchNorm2d"]
__version__ = "0.1.0"
