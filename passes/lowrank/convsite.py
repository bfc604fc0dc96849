"""The k×k Conv sites of the ``svd`` pass: which Convs qualify, the factorization and rank chosen for each, the
calibration statistic (im2col patch second moment) and the rewrite. The math is in ``conv``.

A site is an ai.onnx 2-D Conv with a kernel larger than 1×1, group 1 and a float initializer weight. Depthwise and
grouped Convs are declined (each group is a separate small weight: a factor per group would add nodes for almost no
MACs), as are 1-D/3-D Convs. The choice (``Rule``): each scheme's rank from the pass's criterion — ``rank`` (spatial
r; Tucker r1 = r2 = r, capped by the channels), ``ratio`` (the largest rank whose parameters are at most that
fraction), ``energy`` e (as max-error √(1 − e)) and ``max-error`` (the smallest rank whose error — data-aware: the
layer's output error on the calibration patches, else the weight error — is within it; ranks then rounded up to a
multiple of ``align`` where that still pays) — then, with ``conv=auto``, the scheme with fewer MACs (error criteria)
or the smaller error (rank/ratio). A factorization is kept only if it cuts the layer's MACs by ``min-reduction``.
Chains this pass writes (a kh×1 Conv feeding only a 1×kw Conv; a 1×1 -> k×k -> 1×1 chain narrowing the channels, no
bias before the last) are found by ``conv_chains`` and declined, so a second run changes nothing.
Statistic: ``PatchMoment`` streams the sampled im2col rows of the layer's input (``pruning.fit.ConvFit``'s sampling)
into a ``factor.SecondMoment``, fed with the layer's input and output of the same run.
A site reads its kernel when asked (``WeightSite.w``): the pass holds one weight (and its factorizations) at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passes.base import constant
from graphopt.passes.pruning.fit import ConvFit

from .conv import (SPATIAL, TUCKER, ConvFactors, error_of, mode_svds, spatial, spatial_macs, spatial_svd, tucker,
                   tucker_macs, tucker_ranks)
from .factor import SecondMoment
from .sites import CONV_SPATIAL, FLOATS, SiteDeclined, WeightSite, unique_name, weight_dtype

PATCH_ROWS = 256      # im2col rows sampled per calibration sample and layer


@dataclass
class ConvSite(WeightSite):
    """A k×k Conv; ``w`` is its kernel [C_out, C_in, kh, kw] (read when asked, ``WeightSite``)."""

    @property
    def strides(self) -> tuple[int, int]:
        s = self.node.attrs.get("strides", [1, 1])
        return int(s[0]), int(s[1])


@dataclass(frozen=True)
class Rule:
    """What the pass's options ask of a conv site."""

    scheme: str                 # spatial | tucker | auto
    criterion: tuple[str, float]
    align: int
    min_reduction: float
    damping: float


def conv_site_of(node: gs.Node) -> ConvSite:
    """A k×k Conv as a site, or raise SiteDeclined with the reason (from the weight's dtype and shape)."""
    wt = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(wt, gs.Constant):
        raise SiteDeclined("weight is not a constant (run fold-constants first)")
    dtype, shape = weight_dtype(wt), tuple(int(d) for d in wt.shape)
    if dtype not in FLOATS:
        raise SiteDeclined(f"weight dtype {dtype} is not float")
    group = int(node.attrs.get("group", 1))
    if group != 1:
        kind = "depthwise" if group == shape[0] and shape[1] == 1 else "grouped"
        raise SiteDeclined(f"{kind} Conv (group={group}): only group 1 is factorized")
    if len(shape) != 4:
        raise SiteDeclined(f"{len(shape) - 2}-D Conv: only 2-D kernels are factorized")
    return ConvSite(node, wt, node.inputs[0])


def is_kxk(node: gs.Node) -> bool:
    """A Conv whose constant weight has a kernel larger than 1×1 (1×1 Convs are matrix sites)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return isinstance(w, gs.Constant) and len(w.shape) >= 3 and any(d != 1 for d in w.shape[2:])


def _no_bias(node: gs.Node) -> bool:
    return len(node.inputs) < 3 or node.inputs[2].is_empty()


def _kernel(node: gs.Node) -> tuple[int, ...] | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if node.op != "Conv" or node.domain not in ("", "ai.onnx") or not isinstance(w, gs.Constant) \
            or int(node.attrs.get("group", 1)) != 1:
        return None
    return tuple(int(d) for d in w.shape)


def _only_consumer(node: gs.Node, outputs: set[str]) -> gs.Node | None:
    h = node.outputs[0]
    return h.outputs[0] if len(h.outputs) == 1 and h.name not in outputs else None


def conv_chains(nodes: list[gs.Node], outputs: set[str]) -> dict[int, str]:
    """Convs that are parts of a factorization this pass writes, by ``id(node)``, with the reason."""
    out: dict[int, str] = {}
    for a in nodes:
        ka = _kernel(a)
        b = _only_consumer(a, outputs) if ka and _no_bias(a) else None
        kb = _kernel(b) if b is not None else None
        if not kb or len(ka) != 4 or len(kb) != 4:
            continue
        if ka[2] > 1 and ka[3] == 1 and kb[2] == 1 and kb[3] > 1:
            out[id(a)] = out[id(b)] = f"already a spatial pair ('{a.name}' {ka[2]}x1, '{b.name}' 1x{kb[3]})"
            continue
        c = _only_consumer(b, outputs) if ka[2:] == (1, 1) and kb[2:] != (1, 1) and _no_bias(b) else None
        kc = _kernel(c) if c is not None else None
        if kc and kc[2:] == (1, 1) and ka[0] < ka[1] and kb[0] < kc[0]:
            why = f"already a Tucker chain ('{a.name}', '{b.name}', '{c.name}': {ka[1]}->{ka[0]}->{kb[0]}->{kc[0]})"
            for n in (a, b, c):
                out[id(n)] = why
    return out


def _pays(macs: float, dense: int, rule: Rule) -> bool:
    return macs <= (1.0 - rule.min_reduction) * dense and macs < dense


def _cut(f: ConvFactors, dense: int, rule: Rule) -> str | None:
    """Why ``f`` does not pay, or None."""
    if _pays(f.macs, dense, rule):
        return None
    if f.macs >= dense:
        return f"{f.kind} rank {f.rank_text} would not reduce MACs"
    return (f"{f.kind} rank {f.rank_text} cuts MACs by only {100 * (1 - f.macs / dense):.1f}% < min-reduction "
            f"{100 * rule.min_reduction:g}%")


def _smallest(ladder: list[Any], error: Callable[[Any], float], bound: float) -> int:
    """Index of the first ladder entry whose error is within ``bound`` (errors fall along the ladder)."""
    lo, hi = 0, len(ladder) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if error(ladder[mid]) <= bound * (1 + 1e-9):
            hi = mid
        else:
            lo = mid + 1
    return lo


Memo = dict[tuple[Any, ...], tuple[ConvFactors, float]]


def _scheme(site: ConvSite, w: np.ndarray, kind: str, moment: np.ndarray | None, rule: Rule, memo: Memo
            ) -> tuple[ConvFactors, float, str | None]:
    """The factorization of one scheme that the criterion asks for (aligned where that still pays), its error, and
    why it does not pay (None when it does). Error criteria search only the ranks that pay. ``memo`` keeps every
    factorization built, by weight, statistic and ranks (rank=auto builds the same ones for each bound it tries)."""
    strides = site.strides
    tag = (kind, hashlib.sha1(w.tobytes()).hexdigest(), w.shape, rule.damping,
           None if moment is None else hashlib.sha1(np.ascontiguousarray(moment).tobytes()).hexdigest())
    o, c = w.shape[:2]
    dense = int(np.prod(w.shape))
    if kind == SPATIAL:
        dec = spatial_svd(w)
        ladder: list[Any] = list(range(1, len(dec[1]) + 1))

        def make(r: Any) -> ConvFactors:
            return spatial(w, r, dec, moment, rule.damping, strides)

        def macs(r: Any) -> int:
            return spatial_macs(w.shape, r, strides)

        def aligned(r: Any) -> Any:
            return min(-(-r // rule.align) * rule.align, ladder[-1])
    else:
        modes = mode_svds(w)
        ladder = tucker_ranks(c, o)

        def make(r: Any) -> ConvFactors:
            return tucker(w, r[0], r[1], modes, moment, rule.damping, strides)

        def macs(r: Any) -> int:
            return tucker_macs(w.shape, r[0], r[1], strides)

        def aligned(r: Any) -> Any:
            return min(-(-r[0] // rule.align) * rule.align, c), min(-(-r[1] // rule.align) * rule.align, o)

    def built(r: Any) -> tuple[ConvFactors, float]:
        if (tag, r) not in memo:
            f = make(r)
            memo[tag, r] = f, error_of(w, f, moment)
        return memo[tag, r]

    def build(r: Any) -> ConvFactors:
        return built(r)[0]

    def done(f: ConvFactors) -> tuple[ConvFactors, float, str | None]:
        return f, built(f.ranks[0] if kind == SPATIAL else f.ranks)[1], _cut(f, dense, rule)
    name, value = rule.criterion
    if name == "rank":
        return done(build(int(value) if kind == SPATIAL else (int(value), int(value))))
    if name == "ratio":
        fits = [r for r in ladder if build(r).params <= value * dense]
        if kind == SPATIAL and fits:
            fits = [r for r in fits if r % rule.align == 0] or fits
        return done(build(fits[-1] if fits else ladder[0]))
    bound = float(np.sqrt(max(1.0 - value, 0.0))) if name == "energy" else float(value)
    paying = [r for r in ladder if _pays(macs(r), dense, rule)]
    if not paying:
        return done(build(ladder[0]))
    last, err = built(paying[-1])
    if err > bound * (1 + 1e-9):
        return last, err, (f"{kind} needs an error of {err:.3f} > {bound:g} at rank {last.rank_text}, the largest "
                           f"that cuts MACs by min-reduction {100 * rule.min_reduction:g}%")
    best = build(paying[_smallest(paying, lambda r: built(r)[1], bound)])
    up = build(aligned(best.ranks[0] if kind == SPATIAL else best.ranks))
    return done(up if _pays(up.macs, dense, rule) else best)


def choose(site: ConvSite, w: np.ndarray, moment: np.ndarray | None, rule: Rule, memo: Memo | None = None
           ) -> tuple[ConvFactors, float, str | None]:
    """The factorization for the site (``w``: its kernel, ``site.w`` read once by the caller), its error, and why
    it does not pay (None when it does)."""
    memo = {} if memo is None else memo
    kinds = (SPATIAL, TUCKER) if rule.scheme == "auto" else (rule.scheme,)
    if w.shape[2] == 1 or w.shape[3] == 1:
        kinds = tuple(k for k in kinds if k != SPATIAL) or (TUCKER,)   # a k×1 kernel has no spatial split
    found = [_scheme(site, w, k, moment, rule, memo) for k in kinds]
    paying = [x for x in found if x[2] is None]
    if not paying:
        return found[0][0], found[0][1], "; ".join(x[2] or "" for x in found)
    by_error = rule.criterion[0] in ("rank", "ratio")
    return min(paying, key=lambda x: (x[1], x[0].macs) if by_error else (x[0].macs, x[1]))


class PatchMoment:
    """Second moment of a Conv's sampled im2col input rows: ``x`` and then ``y`` (its output) of each run (the
    patches at the output's positions, ``ConvFit.rows_of``'s sampling). A graph input comes once per batch and its
    runs may be row slices: ``y`` takes the rows next in line. Holds the K×K moment only, never the weight."""

    def __init__(self, node: gs.Node, seed: int = 0) -> None:
        shape = tuple(int(d) for d in node.inputs[1].shape)
        k = int(np.prod(shape[1:]))
        self.patches = ConvFit(node, np.zeros((k, 0)), None, False)    # for its rows_of only: no weight in it
        self.patches.kernel = shape[2:]
        self.moment, self.rng = SecondMoment(k, -1), np.random.default_rng(seed)
        self.x: np.ndarray | None = None
        self.offset = 0

    def see_x(self, x: np.ndarray) -> None:
        self.x, self.offset = np.asarray(x), 0

    def see_y(self, y: np.ndarray) -> None:
        if self.x is None:
            return
        n = y.shape[0]
        x = self.x[self.offset:self.offset + n]
        self.offset += n
        if x.shape[0] == n:
            self.moment.update(self.patches.rows_of(x, np.asarray(y), self.rng, n * PATCH_ROWS)[0])

    def matrix(self) -> np.ndarray | None:
        return self.moment.matrix()


def splice_conv(graph: gs.Graph, site: ConvSite, f: ConvFactors) -> None:
    """Put the factors in: new Convs before the site's node, which becomes the last factor (it keeps the bias)."""
    node, dtype = site.node, site.dtype
    attrs = {k: v for k, v in node.attrs.items() if k in CONV_SPATIAL}
    nd = 2
    pads = list(attrs.get("pads", [0] * 2 * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    strides = list(attrs.get("strides", [1] * nd))
    if f.kind == SPATIAL:
        v, h = f.kernels
        first = [(v, {"kernel_shape": [v.shape[2], 1], "strides": [strides[0], 1], "pads": [pads[0], 0, pads[2], 0],
                      "dilations": [dil[0], 1]})]
        last_attrs = {"kernel_shape": [1, h.shape[3]], "strides": [1, strides[1]], "pads": [0, pads[1], 0, pads[3]],
                      "dilations": [1, dil[1]]}
        last = h
        auto = attrs.get("auto_pad", "NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
            for a in (first[0][1], last_attrs):
                a["auto_pad"] = attrs["auto_pad"]
                a.pop("pads")
    else:
        a_in, core, last = f.kernels
        middle = dict(attrs, kernel_shape=list(core.shape[2:]))
        first = [(a_in, {"kernel_shape": [1, 1]}), (core, middle)]
        last_attrs = {"kernel_shape": [1, 1]}
    x = site.x
    for i, (kernel, a) in enumerate(first):
        h_t = gs.Variable(unique_name(graph, f"{node.outputs[0].name}_{f.kind}{i}"), dtype=node.outputs[0].dtype)
        c = constant(unique_name(graph, f"{site.weight.name}_{f.kind}{i}"), kernel, dtype)
        graph.nodes.append(gs.Node("Conv", name=unique_name(graph, f"{site.name}_{f.kind}{i}"), attrs=a,
                                   inputs=[x, c], outputs=[h_t], domain=node.domain))
        x = h_t
    for key in CONV_SPATIAL + ("kernel_shape",):
        node.attrs.pop(key, None)
    node.attrs.update(last_attrs)
    node.inputs[0] = x
    node.inputs[1] = constant(unique_name(graph, f"{site.weight.name}_{f.kind}{len(first)}"), last, dtype)
