"""The built-in passes: importing this module registers each of them (``passes.base.register``)."""

from . import fold_bn, fold_constants, fuse_conv_relu, prune_channels, prune_layers, quantize, svd  # noqa: F401
