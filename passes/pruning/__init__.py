"""The implementation of ``prune-channels`` (the pass class is in ``passes/prune_channels.py``): dependency-aware
structured pruning of output channels, with optional least-squares reconstruction from calibration data.

Every Conv/ConvTranspose (group 1), Gemm and MatMul with a constant weight is a prunable layer; its output channels
are followed through everything that sees them (BatchNormalization, per-channel constants, activations, pooling,
Resize, Pad, depthwise Conv, Concat, Split, Slice, Flatten/Reshape into a Gemm, ...). Residual Add/Sub/Mul/... of
two variable tensors couple the layers behind them into one *group*, pruned with one index set. A group touching
anything the analysis does not understand (a graph output, a Reshape with a computed shape, a Shape read of the
channel count, an unknown op, a channel-axis reduction, a grouped Conv that is not depthwise) is declined with the
reason. Weights must be initializers: run ``fold-constants`` first on exports that keep them in Constant nodes
(Paddle). Declined: quantized models (prune before quantizing).

Modules, in the order the pass uses them:
  * ``shapes``: tensor shapes for the analysis (inference, else observed in onnxruntime); re-inference after;
  * ``channels``: the analysis state (atoms, union-find, sources, groups) and the per-op handler table, filled by
    ``layers`` (Conv/ConvTranspose/Gemm/MatMul), ``elementwise`` (activations, arithmetic, normalisations),
    ``layout`` (Flatten/Reshape/Transpose/Squeeze/...), ``ranges`` (Concat/Split/Slice/Pad/Resize);
  * ``analysis``: the walk, the dispatch and the groups; ``edits``: the edit records, ``Plan`` and ``apply``;
  * ``importance`` and ``selection``: channel scores, which channels go, the plan;
  * ``fit`` and ``reconstruct``: the ridge least-squares refit of the layers whose inputs shrank;
  * ``config``: options and result keys.
"""
