"""The parts of the ``prune-layers`` pass (passes/prune_layers.py): ``blocks`` (residual blocks: finding them, removing
one, the layers to refit after it). This package's ``__init__`` imports none of them (see passes/__init__.py)."""
