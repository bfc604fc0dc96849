"""The ``quantize`` pass (int8 QDQ for onnxruntime's integer kernels) as a package, one module per step: ``plan``
(units), ``calibrate`` (ranges), ``build`` and ``weights`` (the QDQ model), ``samples`` (samples and the cost
model), ``fallback`` (the float fallback's search), ``cpu`` (the kernel probe), ``report`` (the PassResult) and
``pass_`` (the pass, its options and the overview in its docstring). Importing ``pass_`` registers the pass, as
``passes.catalog`` does.

This module imports none of them: importing a submodule runs this package's ``__init__`` first, so an ``__init__``
that imported them would close an import cycle with every submodule that imports a sibling."""
