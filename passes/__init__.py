"""The rewrite passes, over the contract in ``passes.base``.

One way to lay out a pass: the pass class in its own module ``passes/<name>.py``; a pass too large for one module
keeps its parts in a package named for what they do (``pruning/`` for prune-channels, ``quantization/`` for
quantize, ``lowrank/`` for svd), whose ``__init__`` imports nothing: importing a submodule runs its package's
``__init__`` first, so one that imported its submodules would close an import cycle with every submodule that
imports a sibling. Likewise this ``__init__`` imports no pass; ``passes.catalog`` imports (and so registers) the
built-in ones.
"""
