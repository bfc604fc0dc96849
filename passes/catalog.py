"""The built-in passes: importing this module registers each of them (``passes.base.register``)."""

from . import (fold_bn, fold_constants, fuse_conv_relu, prune_channels, quantize, quantize_dynamic,  # noqa: F401
               quantize_weights, svd)
