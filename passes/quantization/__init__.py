"""The parts of the ``quantize`` pass (passes/quantize.py), one module per step: ``plan`` (units and candidate
tensors), ``calibrate`` (ranges), ``build`` and ``weights`` (the QDQ model), ``samples`` (samples and the cost
model), ``fallback`` (the float fallback's search), ``cpu`` (the kernel probe) and ``report`` (the PassResult).
This package's ``__init__`` imports none of them (see passes/__init__.py)."""
