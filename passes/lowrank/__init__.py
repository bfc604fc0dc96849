"""The parts of the ``svd`` pass (passes/svd.py): ``factor`` (truncated SVD, data-aware whitening, the error
bounds, the input second moments) and ``sites`` (the layers it can factor, their cost, the rewrite). This
package's ``__init__`` imports none of them (see passes/__init__.py)."""
