"""Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
§4.2, in its empirical form), in two parts: the weights' rounding offset from a layer's mean input patch, streamed
(``PatchMeanObserver``, ``rounding_offset``), and the full mean correction of a built int8 model, layer by layer
(``refit_biases``).

A layer computes y_o = W_o · x + b_o per output channel o (x: a Conv's input patch, c·k₁·k₂ values in (channel, row,
column) order per group, zero where the patch reads padding; a Gemm/MatMul's input row). Rounding W to Ŵ (nearest or
GPTQ) adds ΔW_o · x to the output, ΔW = Ŵ − W. Its mean over the data, ΔW_o · E[x], is a constant offset per channel
that every later layer reads as a shifted activation; the zero-mean rest is noise. Subtracting the offset from the
bias, b'_o = b_o − ΔW_o · E[x], removes the mean error (exactly, on the calibration data) at no cost at run time.
High-pass kernels are where it matters: EfficientNet-Lite0's first depthwise convolution holds derivative filters
whose nine weights sum to ~0 against a largest weight of 8–16, so rounding each weight by up to half a step moves
the filter's response to flat image regions by several steps; every weight int8, rounded to nearest, its top-1
agreement with float on other photos is 0.836, and 0.895 with the offsets removed.

E[x] is the mean input patch (``PatchMeanObserver``): for each input channel and kernel tap, the mean over every
output position of the padded input that tap reads, so padding counts as the zeros the convolution sees and the
offset is exactly the mean of ΔW·x over the data (a per-channel mean is not, wherever a tap reads padding: on
PP-OCRv4 rec's maps, 1–3 rows high after its downsampling, that is a third of the taps). Memory is one patch vector
per layer input whatever the sample count; the sum over output positions of a tap is a product with two 0/1
selection matrices (two matrix products per batch), so no patch is ever built.

The weights' offset is one error of several: the activations' rounding and clipping shift the means too (a clipped
tail pulls a mean in), and what the weights' shift had partly offset then shows. With every layer int8, on the
evaluation data (AMD EPYC Zen 4; 7-bit weights as ``reduce-range`` gives on x86 without VNNI): EfficientNet-Lite0
top-1 agreement 0.836 → 0.895 (7-bit: 0.688 → 0.820), PP-OCRv4 rec cosine 0.965 → 0.981 (7-bit: 0.979 → 0.977, the
one loss), det, PP-OCR cls, MTCNN and Magika within 0.0011 either way. Being the layer's own, it holds whichever
layers around it run int8, so the quantize pass's fallback, which switches layers between float and int8 in one
model, searches with it.

The full mean correction takes every shift into account on a model as built: in topological order, each int8
layer's int32 bias moves by the steps that make its output's mean per channel, computed from the int8 input the
corrections above it give, equal float's on the calibration feeds. Both models run cut after each such layer
(``_Segments``: one onnxruntime session per segment, optimizations on, no memory arena; memory holds one feed's
live tensors), the quantized one with each correction applied to what later segments read; over several feeds the
correction is a running mean of each feed's residual, measured under the corrections upstream as they stand (exact
sequential matching for one feed). Every layer int8, eval data: rec 0.981 → 0.991 (7-bit: 0.977 → 0.983),
EfficientNet-Lite0 top-1 0.895 → 0.91, MTCNN onet 0.993 → 0.995 (``benchmarks/RESULTS.md``). The pass applies it to
every model it builds to check or to write.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from graphopt.runtime import session_options, spare_core

from .gptq import ConvGeometry


def _taps(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> np.ndarray | None:
    """[kernel, size] 0/1 matrix: row t marks the input positions (of the unpadded axis) that tap t reads over all
    output positions; None when the padded axis is shorter than the kernel's span (the Conv has no output)."""
    span = (kernel - 1) * dilation + 1
    out = (size + begin + end - span) // stride + 1
    if out <= 0:
        return None
    sel = np.zeros((kernel, size))
    for t in range(kernel):
        pos = t * dilation + stride * np.arange(out) - begin       # positions in the unpadded input
        pos = pos[(pos >= 0) & (pos < size)]                        # the rest read padding: zeros
        np.add.at(sel[t], pos, 1.0)
    return sel


class PatchMeanObserver:
    """Σ x over every input vector a layer reads, and how many: ``sum`` float64 [C, *kernel] (Conv: per input
    channel and tap) or [K] (Gemm/MatMul: one vector per row), ``count`` the vectors (output positions) seen.

    ``conv``: the Conv's geometry (``ConvGeometry``), its input [N, C, *spatial]; None: a row input [..., K]."""

    def __init__(self, conv: ConvGeometry | None = None) -> None:
        self.conv = conv
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim < 2 or x.size == 0:
            return
        if self.conv is None:
            flat = x.reshape(-1, x.shape[-1])
            self._add(flat.sum(axis=0, dtype=np.float64), flat.shape[0])
            return
        _, kernel, strides, pb, pe, dil = self.conv
        spatial = x.shape[2:]
        if len(spatial) != len(kernel):
            return
        sels = [_taps(*args) for args in zip(spatial, kernel, strides, pb, pe, dil)]
        if any(s is None for s in sels):
            return
        xs = x.sum(axis=0, dtype=np.float64)                               # [C, *spatial]
        s = xs @ sels[-1].T                                                # [C, (H,) k_last]
        if len(kernel) == 2:
            s = np.matmul(sels[0], s)                                      # [k0, H] @ [C, H, k1] -> [C, k0, k1]
        positions = int(np.prod([(n + b + e - (k - 1) * d - 1) // st + 1
                                 for n, k, st, b, e, d in zip(spatial, kernel, strides, pb, pe, dil)]))
        self._add(s, x.shape[0] * positions)

    def _add(self, s: np.ndarray, n: int) -> None:
        self.sum = s if self.sum is None else self.sum + s
        self.count += n

    def mean(self) -> np.ndarray | None:
        """E[x]: [C, *kernel] or [K]; None before any data."""
        return None if self.sum is None or self.count == 0 else self.sum / self.count


def rounding_offset(delta: np.ndarray, mean: np.ndarray, group: int = 1) -> np.ndarray:
    """ΔW_o · E[x] for every output channel o: the mean output error of the rounded weights.

    ``delta``: Ŵ − W as [O, C/group, *kernel] (Conv) or [O, K] (rows); ``mean``: ``PatchMeanObserver.mean()``,
    [C, *kernel] or [K]. Output channel o of a grouped Conv reads input channels of group o // (O / group)."""
    d = np.asarray(delta, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    if d.ndim == 2 and m.ndim == 1:
        return d @ m
    out_per_group = d.shape[0] // group
    per_group = m.reshape(group, -1)                                   # [G, C/G · taps]
    rows = d.reshape(group, out_per_group, -1)                         # [G, O/G, C/G · taps]
    return np.einsum("god,gd->go", rows, per_group).reshape(-1)


# ----------------------------------------------------------------------------------------- the full mean correction

# On feeds of at most this many input bytes the full mean correction runs two feeds' quantized sides and the float
# side at once (``refit_biases``): MTCNN O-Net's 16-row feeds are 0.44 MB, PP-OCR cls's 0.75 MB; EfficientNet-Lite0's
# 9.6 MB run one after the other, so memory holds one feed's live tensors.
OVERLAP_FEED_BYTES = 1 << 20


class BiasSite(NamedTuple):
    """An int8 layer whose int32 bias ``refit_biases`` adjusts: its output in the quantized model (channels on axis
    1), the same tensor in the float model, its int32 bias initializer and that bias's per-channel scale."""

    output: str
    reference: str
    bias: str
    scale: np.ndarray


class _Segments:
    """A model cut after each of ``cuts`` (in the order of their producers): segment k runs, in its own onnxruntime
    session (default optimizations, so a segment's complete QDQ patterns run the integer kernels), the nodes after
    cut k-1 up to cut k's producer, from the tensors the feed and the earlier segments made; a tensor is dropped
    once no later node reads it, so memory holds one cut's live tensors (of the rows fed at once)."""

    def __init__(self, model: onnx.ModelProto, cuts: list[str]) -> None:
        # no memory arena: a session per segment would each keep its largest tensors' worth of memory. One thread:
        # a segment is a few layers run once per feed, hundreds of runs per build, where a thread pool's start and
        # spin per run cost more CPU than its parallel work saves (PP-OCR cls, 53 segments x 16 feeds of 16 rows,
        # 2 cores shared: 0.9 s of CPU per build with one thread, 11-19 s with the default two)
        options = session_options(threads=1)
        options.enable_cpu_mem_arena = False

        inits = {t.name: t for t in model.graph.initializer}
        nodes = _toposorted(list(model.graph.node), {i.name for i in model.graph.input} | set(inits))
        where = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        self.cuts = sorted(cuts, key=lambda c: where[c])
        cuts = self.cuts
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(nodes):
            for t in n.input:
                if t:
                    self.last_use[t] = i
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) +
                 list(inferred.graph.input) + list(inferred.graph.output) if v.type.HasField("tensor_type")}

        def info(t: str) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(t, types.get(t) or onnx.TensorProto.FLOAT, None)

        self.parts: list[tuple[Any, list[str], list[str], int]] = []   # session, inputs, outputs, last node index
        start = 0
        for k, cut in enumerate(cuts):
            end = where[cut] + 1
            seg = nodes[start:end]
            made = {o for n in seg for o in n.output if o}
            reads = list(dict.fromkeys(t for n in seg for t in n.input if t))
            ins = [t for t in reads if t not in made and t not in inits]
            outs = [t for t in dict.fromkeys(o for n in seg for o in n.output if o)
                    if t == cut or self.last_use.get(t, -1) >= end]
            graph = helper.make_graph(seg, f"segment_{k}", [info(t) for t in ins], [info(t) for t in outs],
                                      [inits[t] for t in reads if t in inits])
            part = helper.make_model(graph, opset_imports=model.opset_import)
            part.ir_version = model.ir_version
            sess = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self.parts.append((sess, ins, outs, end - 1))
            start = end

    def run(self, feed: dict[str, np.ndarray], at_cut: Callable[[int, np.ndarray], np.ndarray]) -> None:
        """Run the segments on ``feed``; after segment k, ``at_cut(k, value)`` gives what later segments read for
        cut k (the value itself, or a corrected one)."""
        live: dict[str, np.ndarray] = dict(feed)
        for k, (sess, ins, outs, last) in enumerate(self.parts):
            live.update(zip(outs, sess.run(outs, {t: live[t] for t in ins})))
            live[self.cuts[k]] = at_cut(k, live[self.cuts[k]])
            for t in [t for t in live if self.last_use.get(t, -1) <= last]:
                del live[t]


def _toposorted(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each runs after the producers of its inputs (a valid model's order already is; a
    rewrite's export need not be), the original order among the nodes that are ready (Kahn's algorithm on a heap of
    indices). Nodes whose inputs nothing makes (outer scope) keep their place at the end."""
    made = set(available) | {""}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [sum(1 for t in set(n.input) if t not in made and t in producer) for n in nodes]
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in set(n.input):
            if t not in made and t in producer:
                readers.setdefault(producer[t], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    placed = set(order)
    return [nodes[i] for i in order] + [n for i, n in enumerate(nodes) if i not in placed]


def _channel_means(y: np.ndarray) -> tuple[np.ndarray, int]:
    """The mean over every axis but 1 (channels), and how many values each holds (the positions summed in y's own
    precision, pairwise, then the samples in float64)."""
    per_sample = y.reshape(y.shape[0], y.shape[1], -1).sum(axis=2)
    n = int(y.size // y.shape[1])
    return per_sample.sum(axis=0, dtype=np.float64) / n, n


def refit_biases(quantized: onnx.ModelProto, reference: onnx.ModelProto, sites: list[BiasSite],
                 feeds: list[dict[str, np.ndarray]], reference_means: dict[str, list[np.ndarray]] | None = None
                 ) -> dict[str, np.ndarray]:
    """The full mean correction: for each site, in topological order, the int32 bias steps to subtract so that its
    output's mean per channel over ``feeds``, computed from the int8 input the corrections upstream give it, equals
    the float model's. Returns {bias initializer: steps (int64, per channel)}.

    Both models run cut at the sites (``_Segments``); the quantized one with each site's correction applied to what
    later segments read, so a site's correction is measured downstream of the ones above it. The correction is a
    running mean over the feeds (each feed's residual folded in by its share of the samples), so memory holds one
    feed's live tensors however many feeds there are (three on small feeds, run at once: OVERLAP_FEED_BYTES). ``reference_means`` ({float tensor: its channel means, one
    array per feed}) keeps the float model's side between calls on the same feeds: only what it lacks is run."""
    made = {o for n in quantized.graph.node for o in n.output}
    ref_made = {o for n in reference.graph.node for o in n.output}
    sites = [s for s in sites if s.output in made and s.reference in ref_made]
    if not sites:
        return {}
    cache = {} if reference_means is None else reference_means
    missing = list(dict.fromkeys(s.reference for s in sites if s.reference not in cache))
    fresh: dict[str, list[np.ndarray]] = {r: [] for r in missing}     # kept in ``cache`` once every feed ran
    table = {**cache, **fresh}
    means = _reference_side(reference, missing, feeds)
    q = _Segments(quantized, [s.output for s in sites])
    q_site = [next(i for i, s in enumerate(sites) if s.output == c) for c in q.cuts]
    offset = [np.zeros(len(s.scale)) for s in sites]       # running mean of (int8 mean - float mean), per channel
    steps = [np.zeros(len(s.scale), np.int64) for s in sites]
    seen = [0] * len(sites)
    turns = _Turns(len(q.cuts))

    def fold(j: int, feed: dict[str, np.ndarray]) -> None:
        """Feed j's quantized side, each cut's residual folded into its running mean after feed j - 1's."""
        def correct(k: int, y: np.ndarray) -> np.ndarray:
            i = q_site[k]
            with turns.turn(k, j):
                mean, n = _channel_means(y)
                offset[i] += (mean - table[sites[i].reference][j] - offset[i]) * n / (seen[i] + n)
                seen[i] += n
                scale = np.asarray(sites[i].scale, np.float64)
                steps[i] = np.rint(offset[i] / scale).astype(np.int64)
                y -= (steps[i] * scale).astype(y.dtype).reshape((1, -1) + (1,) * (y.ndim - 2))
            return y

        with turns.failing():
            q.run(feed, correct)

    # Small feeds and a spare core: two feeds' quantized sides at once on worker threads (feed j + 1 at a cut while feed j is at a
    # later one; each cut's steps in feed order: ``_Turns``), the float side on this thread; else in turn.
    small = all(sum(v.nbytes for v in f.values() if isinstance(v, np.ndarray)) <= OVERLAP_FEED_BYTES
                for f in feeds) and spare_core()
    with ThreadPoolExecutor(2 if small else 1, thread_name_prefix="graphopt-refit") as pool:
        jobs = []
        for j, feed in enumerate(feeds):
            got = next(means) if missing else {}
            for r in missing:
                fresh[r].append(got[r])
            jobs.append(pool.submit(fold, j, feed))
            if not small:
                jobs[-1].result()
        errors = [e for e in (job.exception() for job in jobs) if e is not None]
        if errors:      # the feed that failed, not the ones it made give up
            raise next((e for e in errors if not isinstance(e, _GaveUp)), errors[0])
    cache.update(fresh)
    return {s.bias: st for s, st in zip(sites, steps)}


class _GaveUp(RuntimeError):
    """A feed that stopped waiting because another one failed (that one's error is what the caller sees)."""


class _Turns:
    """Feed j's step at cut k runs after feed j − 1's, whichever thread runs each feed (the running means fold the
    feeds in order, so the steps are those of one feed after the other); once a feed fails, every waiting one
    fails too instead of waiting for it."""

    def __init__(self, cuts: int) -> None:
        self.next = [0] * cuts
        self.cond = threading.Condition()
        self.failed = False

    @contextlib.contextmanager
    def turn(self, k: int, j: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.next[k] == j or self.failed)
            if self.failed:
                raise _GaveUp("another feed of the mean correction failed")
        yield
        with self.cond:
            self.next[k] += 1
            self.cond.notify_all()

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            with self.cond:
                self.failed = True
                self.cond.notify_all()
            raise


def _reference_side(reference: onnx.ModelProto, cuts: list[str], feeds: list[dict[str, np.ndarray]]
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The float model's channel means at ``cuts`` ({cut: means}), feed by feed, as they are asked for."""
    if not cuts:
        return iter(())
    f = _Segments(reference, cuts)

    def side(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got: dict[str, np.ndarray] = {}

        def keep(k: int, y: np.ndarray) -> np.ndarray:
            got[f.cuts[k]] = _channel_means(y)[0]
            return y

        f.run(feed, keep)
        return got

    return map(side, feeds)
