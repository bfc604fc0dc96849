"""The built-in passes: importing this module registers each of them (``passes.base.register``)."""

from . import fold_bn, fold_constants, fuse_conv_relu, prune_channels, svd  # noqa: F401
from .quantize import pass_ as quantize  # noqa: F401  (the package's pass module: importing it registers quantize)
