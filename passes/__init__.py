"""Rewrite passes, one module each; importing this package registers them all (graphopt.pipeline.registry)."""

from . import fold_constants  # noqa: F401
from . import fold_bn  # noqa: F401
from . import fuse_conv_relu  # noqa: F401
from . import quantize  # noqa: F401
from . import prune_channels  # noqa: F401
from . import svd  # noqa: F401
