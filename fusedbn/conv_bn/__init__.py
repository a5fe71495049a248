"""The conv-output batch norm: a Conv2d and its BatchNorm2d trained as one block (module, functional API, autograd
Function, the fx pass that builds blocks in a model), storing about one activation per block for backward."""

from .function import FusedConvBatchNormFunction, fused_conv_batch_norm
from .module import FusedConvBatchNorm2d

__all__ = ["FusedConvBatchNorm2d", "FusedConvBatchNormFunction", "fused_conv_batch_norm"]
