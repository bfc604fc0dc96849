"""The built-in passes: importing this module registers each of them (``passes.base.register``)."""

from . import (cluster_weights, fold_bn, fold_constants, fuse_conv_relu, prune_channels, prune_layers,  # noqa: F401
               prune_weights, quantize, quantize_dynamic, quantize_weights, svd)
