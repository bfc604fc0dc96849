"""``svd``: low-rank factorization of Gemm / MatMul / Conv weights, applied only where it pays.

A K×N weight W (``y = x·W``) becomes two factors A (K×r), B (r×N) of its truncated SVD, ``y = (x·A)·B``: K·N
parameters and MACs per output vector become r·(K+N), fewer whenever ``r < K·N/(K+N)``. This module is the pass
(rank choice, where it pays, report); ``lowrank`` holds the math (the SVD, whitening by the inputs' second moment
for the data-aware mode, truncation and output errors) and ``sites`` which nodes qualify, their MACs per run and
the rewrite. Neither imports this package back. A k×k Conv (``conv=``, lowrank/conv.py and convsite.py) is split
spatially (kh×1 then 1×kw, Jaderberg et al. scheme 2) or by Tucker-2 (1×1, kh×kw, 1×1); ``conv=auto`` (default)
takes per layer the scheme with fewer MACs at the error asked for (rank/ratio: the smaller error), with the same
criteria, data-aware error (on the layer's im2col patches), min-reduction and min-size rules as a matrix.

Rank: exactly one of ``rank`` (absolute; taken as given), ``ratio`` (keep this fraction of the layer's weight
parameters: ``r = ratio·K·N/(K+N)``), ``energy`` (keep this fraction of Σσ², i.e. a truncation error of
``√(1 − energy)``) or ``max-error`` (largest relative Frobenius error allowed); more than one is a usage error. None
given means ``energy=0.99`` (DEFAULT_ENERGY), chosen on the measurements in benchmarks/results/svd.md: trained
weights have flat spectra, so in plain mode 0.99 keeps nearly full rank and the pass declines (it never silently
hurts a model); in data-aware mode, where it bounds the layer's output error on the calibration data to about 10%,
it cut the MNIST MLP's MACs by 86% at unchanged accuracy (deep transformers compound the per-layer errors: MiniLM's
embedding cosine fell to 0.87, and 0.94 at energy=0.995 for 18% fewer MACs). Ranks chosen by energy/max-error are
rounded *up*, and by ratio *down*, to a multiple of ``align`` (default 16): onnxruntime's MLAS SGEMM packs B in
16-column panels, so the pair at rank 49 runs 17-21% slower than at 48 and only 3-11% faster than at 64 (measured);
rounding up buys accuracy almost for free. If the rounded rank no longer pays, the unrounded one is used.

Where it pays: a layer is left alone, with the reason in the report, when the rank would reduce its MACs by less
than ``min-reduction`` (default 10%: near break-even the second GEMM's fixed cost eats the gain — in probes a 2% cut
ran slower than dense at batch 1, while the 17% cuts in benchmarks/results/svd.md run 1.10–1.24x faster), when it
has fewer than ``min-size`` weight parameters (default 4096 = 64×64: in probes smaller layers never ran faster, and
at batch 1 even 128×128 only broke even — raise it for batch-1 models of small layers), when it is excluded by name
or op type, or when its weight is shared with another node or is a graph output. Half of a factor pair
(``sites.factor_pairs``) is declined, so a second run changes nothing. Without that check it would not: with
``ratio`` or ``energy`` the K×r half of a pair can itself qualify, and refactoring half a pair never beats
refactoring the product.

Data-aware (``data-aware=true``, needs calibration data): minimizes the layer's output error on the calibration
activations instead of the weight error (``lowrank``: the SVD of S·W, SᵀS the damped second moment of the inputs).
``damping`` (default 0.01) makes the objective calibration output error + λ·mean(diag M)·weight error, which keeps
directions the calibration data never excites; measured flat from 0.001 to 0.01 (benchmarks/results/svd.md). In
this mode energy and max-error refer to the singular values of S·W, i.e. to the (regularized) output error on the
calibration data. The second moments of all sites come from one streamed run over the calibration data.
Over 2 GB (docs/big-models.md) each site reads its weight when factorized (``lowrank.sites``): one weight at a time;
the report's calibration output errors are not measured there (every layer's input moment would be held at once).

Report: a layers row per candidate layer (name, op, shape K×N, rank, params and MACs before/after — MACs at batch
1 from shape inference, per output vector when shapes are unknown — relative weight error, and with calibration
data the relative output error ``‖X(W−AB)‖/‖XW‖`` on it, computed exactly from M), declines with reasons, notes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import io
from graphopt.calibration.collector import collect_tensors
from graphopt.calibration.readers import DataSource
from graphopt.graph import describe, export, is_std

from .autosearch import no_targets, search
from .base import Pass, PassContext, PassResult, register
from .options import option, unmatched
from .lowrank.factor import (DEFAULT_DAMPING, Decomposition, SecondMoment, TensorMoments, decompose, rank_for_error,
                      relative_output_error, whitening)
from .lowrank.conv import error_of
from .lowrank.convsite import (ConvSite, Memo, PatchMoment, Rule, choose, conv_chains, conv_site_of, is_kxk,
                               splice_conv)
from .lowrank.report import conv_row, matrix_row
from .lowrank.sites import Site, SiteDeclined, factor_pairs, rows_per_run, site_of, splice

WEIGHTED = ("Gemm", "MatMul", "Conv")
DEFAULT_ENERGY = 0.99
DEFAULT_ALIGN = 16
MAX_NOTES = 12
# rank=auto's candidates: no change, then data-aware relative output error bounds per layer, mildest first.
MAX_ERRORS: tuple[float | None, ...] = (None, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)

# Result count keys.
LAYERS_FACTORIZED = "layers factorized"
PARAMS_REMOVED = "weight parameters removed"
CALIBRATION_SAMPLES = "calibration samples"

Whitening = tuple[np.ndarray, np.ndarray] | None


@register
class SVD(Pass):
    name = "svd"
    summary = "Low-rank factorization of Gemm/MatMul/Conv weights (k x k: spatial or Tucker-2) where it cuts MACs."
    exact = False
    must_not_follow = {"quantize": "quantized weights sit behind DequantizeLinear as integers; factorize the float "
                                   "model, then quantize"}

    @dataclass(frozen=True)
    class Options:
        rank: int | Literal["auto"] | None = option(
            None, "absolute rank of every factorized layer (capped at min(K, N)); auto: per layer the smallest "
            "rank within the largest output error that keeps the pipeline's targets (data-aware, needs "
            "--calib-data)", lo=1)
        ratio: float | None = option(None, "keep this fraction of each layer's weight parameters", lo=0, hi=1,
                                     lo_open=True, hi_open=True)
        energy: float | None = option(None, f"keep this fraction of sum(sigma^2) (default {DEFAULT_ENERGY} when no "
                                            "rank option is given)", lo=0, hi=1, lo_open=True)
        max_error: float | None = option(None, "largest relative Frobenius error of the weight (data-aware: of the "
                                               "calibration output)", lo=0, hi=1, hi_open=True)
        data_aware: bool = option(False, "minimize the output error on --calib-data instead of the weight error")
        damping: float = option(DEFAULT_DAMPING, "data-aware: lambda in M + lambda*mean(diag M)*I", lo=0, hi=1e6)
        min_size: int = option(4096, "skip layers with fewer weight parameters", lo=0)
        min_reduction: float = option(0.1, "factorize only if MACs drop by at least this fraction", lo=0, hi=1,
                                      hi_open=True)
        align: int = option(DEFAULT_ALIGN, "round ranks chosen by energy/max-error up (ratio: down) to a multiple of "
                            "this (not rank: taken as given)", lo=1, hi=1024)
        exclude: tuple[str, ...] = option((), "node names or op types to leave alone (repeat the key)")
        samples: int | None = option(None, "use at most this many calibration samples", lo=1)
        conv: Literal["auto", "spatial", "tucker", "off"] = option(
            "auto", "k x k Convs: spatial (k x 1 then 1 x k), tucker (1x1, k x k, 1x1), auto (per layer the one "
            "with fewer MACs at the error asked for), off (1x1 Convs only)")

        def __post_init__(self) -> None:
            given = [n for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None]
            if len(given) > 1:
                raise ValueError("give at most one of rank, ratio, energy, max-error (got "
                                 + ", ".join(g.replace("_", "-") for g in given) + ")")
            if self.align != DEFAULT_ALIGN and isinstance(self.rank, int):
                raise ValueError("option 'align' rounds the ranks chosen by ratio, energy or max-error; rank is "
                                 "taken as given")
            if self.damping != DEFAULT_DAMPING and not self.data_aware and self.rank != "auto":
                raise ValueError("option 'damping' is read by data-aware=true only; add data-aware=true (and "
                                 "--calib-data)")

        def criterion(self) -> tuple[str, float]:
            for n in ("rank", "ratio", "energy", "max_error"):
                if getattr(self, n) is not None:
                    return n, getattr(self, n)
            return "energy", DEFAULT_ENERGY

    def __init__(self, options: Any, memo: Memo | None = None) -> None:
        super().__init__(options)
        # Internal (tests only): factorize even when MACs would not drop, e.g. at full rank to check exactness.
        self.require_gain = True
        self.memo: Memo = {} if memo is None else memo    # conv factorizations built (rank=auto: shared)

    def needs_calibration(self) -> bool:
        return bool(self.options.data_aware) or self.options.rank == "auto"

    def searches(self) -> bool:
        return self.options.rank == "auto"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.options.rank == "auto":
            return self._auto(graph, ctx)
        res = PassResult()
        o = self.options
        weighted = [n for n in graph.nodes if is_std(n, *WEIGHTED)]
        typos = unmatched(self.name, "exclude", o.exclude, [n.name for n in weighted], ops={n.op for n in weighted},
                          what="Gemm/MatMul/Conv node")
        sites, convs = self._sites(graph, res)
        rows = rows_per_run(graph, ctx.original, [s.node for s in [*sites, *convs]])
        moments: dict[int, np.ndarray] = {}
        big = io.is_big(ctx.original)     # data-aware=true is refused there (pipeline.BIG_MODEL_REFUSED)
        if (sites or convs) and (o.data_aware or (ctx.calib is not None and not big)):
            calib = ctx.require_calib(self.name) if o.data_aware else ctx.calib
            moments = self._observe(graph, ctx, sites, convs, calib, res)
        white: dict[int, Whitening] = {}   # by id(moment): Q, K and V projections share one input: whiten it once
        for site in sites:
            self._factorize(graph, site, moments.get(id(site)), rows.get(id(site.node)), white, res)
        rule = Rule(o.conv, o.criterion(), o.align, o.min_reduction, o.damping)
        for conv in convs:
            moment = moments.get(id(conv))
            self._factorize_conv(graph, conv, moment if o.data_aware else None, moment, rows.get(id(conv.node)),
                                 rule, res)
        kind, value = o.criterion()
        crit = f"{kind.replace('_', '-')}={value:g}" + ("" if kind == "rank" else f", align={o.align}")
        res.notes.insert(0, f"{crit}, min-reduction={o.min_reduction:g}, min-size={o.min_size}; "
                            + (f"data-aware (damping {o.damping:g}, {res.counts.get(CALIBRATION_SAMPLES, 0):.0f}"
                               " calibration samples)" if o.data_aware else "plain SVD"))
        if len(res.notes) > MAX_NOTES + 1:
            extra = len(res.notes) - MAX_NOTES - 1
            res.notes = res.notes[:MAX_NOTES + 1] + [f"... and {extra} more layers (see --report)"]
        if not o.data_aware and any("would not reduce MACs" in d["reason"] for d in res.declined):
            res.notes.insert(1, "hint: trained weights have flat spectra; data-aware=true (with --calib-data) "
                                "reaches the same output error at far lower ranks")
        res.notes[1:1] = typos
        if big and ctx.calib is not None and not o.data_aware:
            res.notes.append("model over 2 GB: calibration output errors not measured (each layer's K x K input "
                             "moment would be held at once)")
        return res

    def _auto(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """rank=auto: the largest data-aware output error bound (MAX_ERRORS) that keeps the pipeline's targets
        (passes/autosearch.py); each layer then takes the smallest rank (a multiple of ``align``) within it, where
        that cuts its MACs."""
        res = PassResult()
        reason = no_targets(ctx, "rank")
        if reason:
            res.decline("model", f"{reason}; give a rank, ratio, energy or max-error")
            return res

        def with_error(e: float | None) -> SVD:
            return SVD(dataclasses.replace(self.options, rank=None, max_error=e, data_aware=True), self.memo)

        found = search(MAX_ERRORS, lambda g, e, c: with_error(e).run(g, c), graph, ctx, self.name)
        error = MAX_ERRORS[found.index]
        note = found.note("rank", f"max-error={error}" if error is not None else "no layer changed", ctx.targets)
        if error is None:
            res.notes.append(note)
            return res
        res = with_error(error).run(graph, ctx)
        res.notes.insert(0, note)
        return res

    def _sites(self, graph: gs.Graph, res: PassResult) -> tuple[list[Site], list[ConvSite]]:
        """The sites to factorize (matrix sites, k×k Conv sites); the others declined, with a layers row for those
        that are sites."""
        outputs = {t.name for t in graph.outputs}
        chains = conv_chains(graph.nodes, outputs)
        found: list[Site | ConvSite] = []
        for node in graph.nodes:
            if not is_std(node, *WEIGHTED):
                continue
            where = describe(node)
            if node.name in self.options.exclude or node.op in self.options.exclude:
                res.decline(where, "excluded by option")
            elif id(node) in chains:
                res.decline(where, chains[id(node)])
            elif node.op == "Conv" and self.options.conv == "off" and is_kxk(node):
                res.decline(where, "k x k Conv and conv=off")
            else:
                try:
                    found.append(conv_site_of(node) if node.op == "Conv" and is_kxk(node) else site_of(node))
                except SiteDeclined as e:
                    res.decline(where, str(e))
        paired = factor_pairs([s for s in found if isinstance(s, Site)], outputs)
        sites: list[Site] = []
        convs: list[ConvSite] = []
        for s in found:
            size = s.size
            reason = paired.get(id(s))
            if reason is None and (len(s.weight.outputs) > 1 or s.weight.name in outputs):
                others = len(s.weight.outputs) - 1
                reason = f"weight '{s.weight.name}' is shared ({others} other use{'s' if others != 1 else ''})" \
                    if others else f"weight '{s.weight.name}' is a graph output"
            elif reason is None and size < self.options.min_size:
                reason = f"{size} weight parameters < min-size {self.options.min_size}"
            if reason:
                res.decline(s.desc, reason)
                res.layers.append(matrix_row(s, status="declined: " + reason) if isinstance(s, Site)
                                  else conv_row(s, status="declined: " + reason))
            else:
                (sites if isinstance(s, Site) else convs).append(s)
        return sites, convs

    def _observe(self, graph: gs.Graph, ctx: PassContext, sites: list[Site], convs: list[ConvSite],
                 calib: DataSource, res: PassResult) -> dict[int, np.ndarray]:
        """Second moment of every site's activation rows (Conv sites: of their im2col patches) on the calibration
        data (one streamed run), by id(site)."""
        obs: dict[str, TensorMoments] = {}
        per_site: dict[int, SecondMoment | PatchMoment] = {}
        for s in sites:
            per_site[id(s)] = obs.setdefault(s.x.name, TensorMoments()).get(s.dims[0], s.axis)
        for c in convs:
            pm = per_site[id(c)] = PatchMoment(c.node, ctx.seed)
            obs.setdefault(c.x.name, TensorMoments()).hooks.append(pm.see_x)
            obs.setdefault(c.node.outputs[0].name, TensorMoments()).hooks.append(pm.see_y)
        res.counts[CALIBRATION_SAMPLES] = collect_tensors(export(graph, ctx.original), obs, calib,
                                                          max_samples=self.options.samples)
        matrices = {id(sm): sm.matrix() for sm in per_site.values()}  # one array per tensor: sites share it
        return {k: m for k, sm in per_site.items() if (m := matrices[id(sm)]) is not None}

    def _choose(self, dec: Decomposition, k: int, n: int) -> int:
        """The rank the options ask for, aligned (see the module docstring)."""
        o = self.options
        full = len(dec.s)
        kind, value = o.criterion()
        if kind == "rank":
            return min(int(value), full)
        if kind == "ratio":
            r = max(1, int(value * k * n / (k + n)))
            aligned = r // o.align * o.align
            return min(aligned if aligned >= 1 else r, full)
        r = rank_for_error(dec.s, math.sqrt(max(1.0 - value, 0.0)) if kind == "energy" else value)
        aligned = min(-(-r // o.align) * o.align, full)
        return aligned if self._pays(aligned, k, n) else r

    def _pays(self, r: int, k: int, n: int) -> bool:
        return r * (k + n) <= (1.0 - self.options.min_reduction) * k * n and r * (k + n) < k * n

    def _factorize(self, graph: gs.Graph, site: Site, moment: np.ndarray | None, rows: int | None,
                   white: dict[int, Whitening], res: PassResult) -> None:
        """Factorize one site if its rank pays, else decline it; ``white`` caches whitenings by id(moment)."""
        o = self.options
        k, n = site.dims
        whitened = None
        if o.data_aware and moment is None:
            res.notes.append(f"{site.desc}: no calibration statistics for '{site.x.name}'; plain SVD")
        if o.data_aware and moment is not None:
            if id(moment) not in white:
                white[id(moment)] = whitening(moment, o.damping)
            whitened = white[id(moment)]
        w = site.w     # read now, dropped when this site is done (a big model's weights one at a time)
        dec = decompose(w, white=whitened)
        r = self._choose(dec, k, n)
        if not self._pays(r, k, n) and self.require_gain:
            why = self._why_not(r, k, n)
            res.decline(site.desc, why)
            res.layers.append(matrix_row(site, rank=r, rows=rows, status="declined: " + why))
            return
        a, b = dec.factors(r)
        approx = a @ b
        w_norm = float(np.linalg.norm(w))
        w_err = float(np.linalg.norm(w - approx)) / w_norm if w_norm > 0 else 0.0
        out_err = relative_output_error(w, approx, moment) if moment is not None else None
        del w, approx
        splice(graph, site, a, b)
        res.changed = True
        res.count(LAYERS_FACTORIZED)
        res.count(PARAMS_REMOVED, k * n - r * (k + n))
        res.layers.append(matrix_row(site, rank=r, rows=rows, status="factorized", weight_error=w_err,
                               output_error=out_err))
        res.notes.append(f"{site.desc} {k}x{n} -> rank {r}: MACs {100 * (1 - r * (k + n) / (k * n)):.0f}% fewer, "
                         f"weight error {w_err:.4f}" + ("" if out_err is None else
                                                        f", calibration output error {out_err:.4f}"))

    def _factorize_conv(self, graph: gs.Graph, site: ConvSite, moment: np.ndarray | None,
                        measured: np.ndarray | None, rows: int | None, rule: Rule, res: PassResult) -> None:
        """Factorize one k×k Conv if a scheme pays (``moment``: data-aware; ``measured``: for the report)."""
        w = site.w     # read now, dropped when this site is done
        f, _, why = choose(site, w, moment, rule, self.memo)
        if why and self.require_gain:
            res.decline(site.desc, why)
            res.layers.append(conv_row(site, f, rows=rows, status="declined: " + why))
            return
        w_err = error_of(w, f, None)
        out_err = error_of(w, f, measured) if measured is not None else None
        splice_conv(graph, site, f)
        dense = site.size
        res.changed = True
        res.count(LAYERS_FACTORIZED)
        res.count(PARAMS_REMOVED, dense - f.params)
        res.layers.append(conv_row(site, f, rows=rows, status="factorized", weight_error=w_err, output_error=out_err))
        res.notes.append(f"{site.desc} {'x'.join(map(str, site.shape))} -> {f.kind} rank {f.rank_text}: MACs "
                         f"{100 * (1 - f.macs / dense):.0f}% fewer, weight error {w_err:.4f}"
                         + ("" if out_err is None else f", calibration output error {out_err:.4f}"))

    def _why_not(self, r: int, k: int, n: int) -> str:
        """Why rank ``r`` does not pay for a K×N weight."""
        if r * (k + n) >= k * n:
            return f"rank {r} would not reduce MACs (a {k}x{n} weight needs rank < {k * n / (k + n):.1f})"
        need = math.floor((1.0 - self.options.min_reduction) * k * n / (k + n))
        return (f"rank {r} cuts MACs by only {100 * (1 - r * (k + n) / (k * n)):.1f}% < min-reduction "
                f"{100 * self.options.min_reduction:g}% (needs rank <= {need})")
