"""``svd``: low-rank factorization of Gemm / MatMul / 1×1 Conv weights, applied only where it pays.

A weight seen as ``y = x·W`` with W of shape K×N (in features × out features) is replaced by two factors from its
truncated SVD ``W = U·Σ·Vᵀ``: ``A = U_r·Σ_r^½`` (K×r) and ``B = Σ_r^½·V_rᵀ`` (r×N), so ``y = (x·A)·B``. Parameters
and MACs per output vector go from K·N to r·(K+N): fewer whenever ``r < K·N/(K+N)``.

Cases (matched on ai.onnx ops; the weight must be a float initializer used by this node only):
  * Gemm: ``Y = alpha·A'·B' + beta·C``; the weight is B (B' = Bᵀ with ``transB``), the activation A (transposed by
    ``transA``). Becomes ``Gemm(A, W1; transA) -> Gemm(H, W2, C; alpha, beta)``: the bias (vector, matrix or
    scalar) and alpha/beta stay on the second factor; both factors keep the original ``transB`` layout. Below opset
    11 (where C is required) the first Gemm gets a zero scalar C.
  * MatMul whose second input is a constant 2-D weight, any number of leading dims on the activation:
    ``MatMul(MatMul(x, A), B)``.
  * Conv with a 1×1 (1×…×1) kernel and group 1 (a matmul over channels at every pixel): two 1×1 Convs; the first
    keeps strides, pads, auto_pad and dilations (for a 1×1 kernel they only pick and pad pixels), the second is
    plain and carries the bias.

Rank: exactly one of ``rank`` (absolute; taken as given), ``ratio`` (keep this fraction of the layer's weight
parameters), ``energy`` (keep this fraction of Σσ²) or ``max-error`` (largest relative Frobenius error allowed);
more than one is a usage error. None given means ``energy=0.99`` (DEFAULT_ENERGY), chosen on the measurements in
benchmarks/results/svd.md: trained weights have flat spectra, so in plain mode 0.99 keeps nearly full rank and the
pass declines (it never silently hurts a model); in data-aware mode, where it bounds the layer's output error on the
calibration data to about 10%, it cut the MNIST MLP's MACs by 86% at unchanged accuracy (deep transformers compound
the per-layer errors: MiniLM's embedding cosine fell to 0.87, and 0.94 at energy=0.995 for 18% fewer MACs). Ranks
chosen by energy/max-error are rounded *up*, and by ratio *down*, to a multiple of ``align`` (default 16):
onnxruntime's MLAS SGEMM packs B in 16-column panels, so the pair at rank 49 runs 17-21% slower than at 48 and only
3-11% faster than at 64 (measured); rounding up buys accuracy almost for free. If the rounded rank no longer pays,
the unrounded one is used.

Where it pays: a layer is left alone, with the reason in the report, when the rank would reduce its MACs by less
than ``min-reduction`` (default 10%: near break-even the second GEMM's fixed cost eats the gain — in probes a 2% cut
ran slower than dense at batch 1, while the 17% cuts in benchmarks/results/svd.md run 1.10–1.24x faster), when it
has fewer than ``min-size`` weight parameters (default 4096 = 64×64: in probes smaller layers never ran faster, and
at batch 1 even 128×128 only broke even — raise it for batch-1 models of small layers), when it is excluded by name
or op type, or when its weight is shared with another node or is a graph output. A layer that is half of a factor
pair (a weighted node with no bias whose only consumer is a weighted node of the same op, through an inner dimension
smaller than both outer ones) is declined, so a second run changes nothing. Without that check it would not: with
``ratio`` or ``energy`` the K×r half of a pair can itself qualify, and refactoring half a pair never beats
refactoring the product.

Data-aware (``data-aware=true``, needs calibration data): minimizes the layer's output error ``‖X·W − X·A·B‖`` on
the calibration activations X instead of ``‖W − A·B‖``. The second moment ``M = XᵀX/n`` (K×K; each batch's product
in the activations' precision, summed in float64 as batches stream, so memory does not grow with the samples; for a
1×1 Conv a row of X is the channel vector of one pixel) is regularized, ``M + λ·mean(diag M)·I`` with λ =
``damping`` (default 0.01: the objective becomes calibration output error + λ·mean(diag M)·weight error, which keeps
directions the calibration data never excites; measured flat from 0.001 to 0.01, benchmarks/results/svd.md), and
factored ``M = SᵀS`` (Cholesky, ``S = Lᵀ``; eigh, ``S = Λ^½Qᵀ``, if that fails). Then ``S·W = U·Σ·Vᵀ``, ``A =
S⁻¹·U_r·Σ_r^½``, ``B = Σ_r^½·V_rᵀ``. In this mode energy and max-error refer to the singular values of S·W, i.e. to
the (regularized) output error on the calibration data.

Report: a layers row per candidate layer (name, op, shape K×N, rank, params and MACs before/after — MACs at batch
1 from shape inference, per output vector when shapes are unknown — relative weight error, and with calibration
data the relative output error ``‖X(W−AB)‖/‖XW‖`` on it, computed exactly from M), declines with reasons, notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt.calibration.collector import collect
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.options import option

from graphopt.graph import export

STANDARD = ("", "ai.onnx", None)
WEIGHTED = ("Gemm", "MatMul", "Conv")
FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
DEFAULT_ENERGY = 0.99
DEFAULT_DAMPING = 0.01
MAX_NOTES = 12


# ------------------------------------------------------------------------------------------------------- math


@dataclass
class Decomposition:
    """SVD of W (plain) or of S·W (data-aware, ``s_inv`` = S⁻¹); ``factors(r)`` gives A (K×r) and B (r×N)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    s_inv: np.ndarray | None = None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root
        if self.s_inv is not None:
            a = self.s_inv @ a
        return a, root[:, None] * self.vt[:rank]


def whitening(moment: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, np.ndarray] | None:
    """(S, S⁻¹) with SᵀS = M + damping·mean(diag M)·I: Cholesky (S = Lᵀ), or eigh (S = Λ^½Qᵀ) when M is too
    ill-conditioned for it; None when M is zero (no signal: use the plain SVD)."""
    m = np.asarray(moment, np.float64)
    m = (m + m.T) / 2
    scale = float(np.mean(np.diag(m)))
    if not scale > 0:
        return None
    reg = m + damping * scale * np.eye(m.shape[0])
    try:
        chol = np.linalg.cholesky(reg)
        inv = np.linalg.inv(chol)
        if np.all(np.isfinite(inv)):
            return chol.T, inv.T
    except np.linalg.LinAlgError:
        pass
    ev, q = np.linalg.eigh(reg)
    root = np.sqrt(np.maximum(ev, 1e-12 * scale))  # an undamped singular M: keep S invertible
    return root[:, None] * q.T, q / root


def decompose(w: np.ndarray, moment: np.ndarray | None = None, damping: float = DEFAULT_DAMPING, *,
              white: tuple[np.ndarray, np.ndarray] | None = None) -> Decomposition:
    """Plain SVD of ``w`` (K×N), or with ``moment`` (K×K second moment of the inputs; or its precomputed
    ``white``-ning) the SVD of S·w."""
    w = np.asarray(w, np.float64)
    if white is None and moment is not None:
        white = whitening(moment, damping)
    if white is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Decomposition(u, s, vt)
    s_mat, s_inv = white
    u, s, vt = np.linalg.svd(s_mat @ w, full_matrices=False)
    return Decomposition(u, s, vt, s_inv)


def truncation_error(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)."""
    s2 = np.asarray(s, np.float64) ** 2
    total = float(s2.sum())
    return math.sqrt(max(float(s2[rank:].sum()), 0.0) / total) if total > 0 else 0.0


def rank_for_error(s: np.ndarray, max_error: float) -> int:
    """Smallest rank whose truncation error is at most ``max_error`` (at least 1)."""
    s2 = np.asarray(s, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = Σ_{i>=r} σᵢ²
    ok = np.nonzero(tail <= (max_error ** 2) * total * (1 + 1e-12))[0]
    return max(1, int(ok[0]))


def relative_output_error(w: np.ndarray, approx: np.ndarray, moment: np.ndarray) -> float:
    """‖X(W − W')‖_F / ‖XW‖_F from the second moment M = XᵀX/n alone."""
    d = np.asarray(w, np.float64) - approx
    num = float(np.sum((moment @ d) * d))
    den = float(np.sum((moment @ w) * w))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


class SecondMoment:
    """Streaming XᵀX/n of the rows of X, a row being the vector along ``axis`` of each observed array."""

    def __init__(self, k: int, axis: int) -> None:
        self.k, self.axis = k, axis
        self.sum = np.zeros((k, k), np.float64)
        self.n = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[self.axis] != self.k:
            return
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, self.k)
        rows = rows.astype(np.float32 if x.dtype != np.float64 else np.float64)
        self.sum += (rows.T @ rows).astype(np.float64)
        self.n += rows.shape[0]

    def matrix(self) -> np.ndarray | None:
        return self.sum / self.n if self.n else None


class _Observers:
    """All SecondMoments of one tensor (a tensor can feed a MatMul and a transA Gemm), updated together."""

    def __init__(self) -> None:
        self.by_axis: dict[tuple[int, int], SecondMoment] = {}

    def get(self, k: int, axis: int) -> SecondMoment:
        return self.by_axis.setdefault((k, axis), SecondMoment(k, axis))

    def update(self, x: np.ndarray) -> None:
        for m in self.by_axis.values():
            m.update(x)


# ------------------------------------------------------------------------------------------------------ sites


@dataclass
class Site:
    """A weighted node whose weight is a K×N matrix in the ``x·W`` convention."""

    node: gs.Node
    weight: gs.Constant
    w: np.ndarray          # K×N float64
    x: gs.Tensor           # activation input
    axis: int              # the activation's feature axis (rows of X are vectors along it)
    has_bias: bool

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def desc(self) -> str:
        return f"{self.node.op} '{self.name}'"


class _Decline(Exception):
    pass


def _site(node: gs.Node) -> Site:
    """The node as a factorization site, or raise _Decline with the reason."""
    if len(node.inputs) < 2:
        raise _Decline("missing weight input")
    x, wt = node.inputs[0], node.inputs[1]
    if not isinstance(wt, gs.Constant):
        raise _Decline("weight is not a constant (an activation, a graph input, or a Constant node: run "
                       "fold-constants first)")
    values = np.asarray(wt.values)
    if values.dtype not in FLOATS:
        raise _Decline(f"weight dtype {values.dtype} is not float")
    c = node.inputs[2] if len(node.inputs) > 2 else None
    # A zero constant C is no bias (the first factor of a Gemm below opset 11 carries one).
    bias = c is not None and not c.is_empty() and not (isinstance(c, gs.Constant) and not np.any(c.values))
    if node.op == "Gemm":
        if values.ndim != 2:
            raise _Decline(f"weight of rank {values.ndim}")
        w = values.T if node.attrs.get("transB", 0) else values
        axis = 0 if node.attrs.get("transA", 0) else -1
    elif node.op == "MatMul":
        if values.ndim != 2:
            raise _Decline(f"constant weight of rank {values.ndim} (need a 2-D matrix)")
        w, axis = values, -1
    else:  # Conv
        if values.ndim < 3 or any(d != 1 for d in values.shape[2:]):
            raise _Decline(f"kernel {'x'.join(map(str, values.shape[2:])) or 'of rank < 3'} is not 1x1")
        if node.attrs.get("group", 1) != 1:
            raise _Decline(f"group={node.attrs.get('group')} (need 1)")
        w, axis = values.reshape(values.shape[0], values.shape[1]).T, 1
    return Site(node, wt, np.asarray(w, np.float64), x, axis, bias)


def _feature_dims(site: Site) -> tuple[int, int]:
    return int(site.w.shape[0]), int(site.w.shape[1])


# ------------------------------------------------------------------------------------------------------- pass


@register
class SVD(Pass):
    name = "svd"
    summary = "Low-rank (SVD) factorization of Gemm/MatMul/1x1-Conv weights where it cuts MACs; optionally data-aware."
    exact = False
    must_not_follow = {"quantize": "quantized weights sit behind DequantizeLinear as integers; factorize the float "
                                   "model, then quantize"}

    @dataclass(frozen=True)
    class Options:
        rank: int | None = option(None, "absolute rank of every factorized layer (capped at min(K, N))", lo=1)
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
        align: int = option(16, "round ranks chosen by energy/max-error up (ratio: down) to a multiple of this",
                            lo=1, hi=1024)
        exclude: tuple[str, ...] = option((), "node names or op types to leave alone (repeat the key)")
        samples: int | None = option(None, "use at most this many calibration samples", lo=1)

        def __post_init__(self) -> None:
            given = [n for n in ("rank", "ratio", "energy", "max_error") if getattr(self, n) is not None]
            if len(given) > 1:
                raise ValueError("give at most one of rank, ratio, energy, max-error (got "
                                 + ", ".join(g.replace("_", "-") for g in given) + ")")

        def criterion(self) -> tuple[str, float]:
            for n in ("rank", "ratio", "energy", "max_error"):
                if getattr(self, n) is not None:
                    return n, getattr(self, n)
            return "energy", DEFAULT_ENERGY

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        # Internal (tests only): factorize even when MACs would not drop, e.g. at full rank to check exactness.
        self.require_gain = True
        self._white: dict[int, Any] = {}

    def needs_calibration(self) -> bool:
        return bool(self.options.data_aware)

    # ----------------------------------------------------------------------------------------------- run

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        sites = self._sites(graph, res)
        rows = _rows_per_run(graph, ctx, [s.node for s in sites])
        moments: dict[int, np.ndarray] = {}
        self._white: dict[int, Any] = {}
        if sites and (o.data_aware or ctx.calib is not None):
            calib = ctx.require_calib(self.name) if o.data_aware else ctx.calib
            moments = self._observe(graph, ctx, sites, calib, res)
        kind, value = o.criterion()
        for site in sites:
            self._factorize(graph, site, moments.get(id(site)), rows.get(id(site.node)), res)
        crit = f"{kind.replace('_', '-')}={value:g}" + ("" if kind == "rank" else f", align={o.align}")
        res.notes.insert(0, f"{crit}, min-reduction={o.min_reduction:g}, min-size={o.min_size}; "
                            + (f"data-aware (damping {o.damping:g}, {res.counts.get('calibration samples', 0):.0f}"
                               " calibration samples)" if o.data_aware else "plain SVD"))
        if len(res.notes) > MAX_NOTES + 1:
            extra = len(res.notes) - MAX_NOTES - 1
            res.notes = res.notes[:MAX_NOTES + 1] + [f"... and {extra} more layers (see --report)"]
        if not o.data_aware and any("would not reduce MACs" in d["reason"] for d in res.declined):
            res.notes.insert(1, "hint: trained weights have flat spectra; data-aware=true (with --calib-data) "
                                "reaches the same output error at far lower ranks")
        return res

    # ------------------------------------------------------------------------------------------- planning

    def _sites(self, graph: gs.Graph, res: PassResult) -> list[Site]:
        outputs = {t.name for t in graph.outputs}
        found: list[Site] = []
        for node in graph.nodes:
            if node.domain not in STANDARD or node.op not in WEIGHTED:
                continue
            if node.name in self.options.exclude or node.op in self.options.exclude:
                res.decline(f"{node.op} '{node.name}'", "excluded by option")
                continue
            try:
                found.append(_site(node))
            except _Decline as e:
                res.decline(f"{node.op} '{node.name or node.outputs[0].name}'", str(e))
        paired = _factor_pairs(found, outputs)
        sites: list[Site] = []
        for s in found:
            k, n = _feature_dims(s)
            reason = None
            if id(s) in paired:
                reason = paired[id(s)]
            elif len(s.weight.outputs) > 1 or s.weight.name in outputs:
                others = len(s.weight.outputs) - 1
                reason = f"weight '{s.weight.name}' is shared ({others} other use{'s' if others != 1 else ''})" \
                    if others else f"weight '{s.weight.name}' is a graph output"
            elif k * n < self.options.min_size:
                reason = f"{k * n} weight parameters < min-size {self.options.min_size}"
            if reason:
                res.decline(s.desc, reason)
                res.layers.append(_row(s, status="declined: " + reason))
            else:
                sites.append(s)
        return sites

    def _observe(self, graph: gs.Graph, ctx: PassContext, sites: list[Site], calib: Any,
                 res: PassResult) -> dict[int, np.ndarray]:
        """Second moment of every site's activation rows on the calibration data (one streamed run)."""
        obs: dict[str, _Observers] = {}
        per_site: dict[int, SecondMoment] = {}
        for s in sites:
            per_site[id(s)] = obs.setdefault(s.x.name, _Observers()).get(s.w.shape[0], s.axis)
        inputs = {t.name for t in graph.inputs}
        fetch = [n for n in obs if n not in inputs]
        model = export(graph, ctx.original)

        def batches() -> Iterator[Any]:
            for b in calib:
                for name in inputs & obs.keys():
                    if name in b.feed:
                        obs[name].update(b.feed[name])
                yield b

        res.counts["calibration samples"] = collect(model, fetch, batches(), obs, max_samples=self.options.samples)
        matrices = {id(sm): sm.matrix() for sm in per_site.values()}  # one array per tensor: sites share it
        return {k: m for k, sm in per_site.items() if (m := matrices[id(sm)]) is not None}

    # ---------------------------------------------------------------------------------------- factorizing

    def _choose(self, dec: Decomposition, k: int, n: int) -> int:
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
                   res: PassResult) -> None:
        o = self.options
        k, n = _feature_dims(site)
        white = None
        if o.data_aware and moment is None:
            res.notes.append(f"{site.desc}: no calibration statistics for '{site.x.name}'; plain SVD")
        if o.data_aware and moment is not None:
            if id(moment) not in self._white:  # Q, K and V projections share one input: whiten it once
                self._white[id(moment)] = whitening(moment, o.damping)
            white = self._white[id(moment)]
        dec = decompose(site.w, white=white)
        r = self._choose(dec, k, n)
        if not self._pays(r, k, n) and self.require_gain:
            need = math.floor((1.0 - o.min_reduction) * k * n / (k + n))
            if r * (k + n) >= k * n:
                why = f"rank {r} would not reduce MACs (a {k}x{n} weight needs rank < {k * n / (k + n):.1f})"
            else:
                why = (f"rank {r} cuts MACs by only {100 * (1 - r * (k + n) / (k * n)):.1f}% < min-reduction "
                       f"{100 * o.min_reduction:g}% (needs rank <= {need})")
            res.decline(site.desc, why)
            res.layers.append(_row(site, rank=r, rows=rows, status="declined: " + why))
            return
        a, b = dec.factors(r)
        approx = a @ b
        w_norm = float(np.linalg.norm(site.w))
        w_err = float(np.linalg.norm(site.w - approx)) / w_norm if w_norm > 0 else 0.0
        out_err = relative_output_error(site.w, approx, moment) if moment is not None else None
        _splice(graph, site, a, b)
        res.changed = True
        res.count("layers factorized")
        res.count("weight parameters removed", k * n - r * (k + n))
        row = _row(site, rank=r, rows=rows, status="factorized", weight_error=w_err, output_error=out_err)
        res.layers.append(row)
        res.notes.append(f"{site.desc} {k}x{n} -> rank {r}: MACs {100 * (1 - r * (k + n) / (k * n)):.0f}% fewer, "
                         f"weight error {w_err:.4f}" + ("" if out_err is None else
                                                        f", calibration output error {out_err:.4f}"))


def _row(site: Site, *, status: str, rank: int | None = None, rows: int | None = None,
         weight_error: float | None = None, output_error: float | None = None) -> dict[str, Any]:
    k, n = _feature_dims(site)
    per = rows or 1
    after = rank * (k + n) if rank is not None and status == "factorized" else k * n
    return {"layer": site.name, "op": site.node.op, "shape": f"{k}x{n}", "rank": rank,
            "params_before": k * n, "params_after": after,
            "macs_before": k * n * per, "macs_after": after * per,
            "macs_basis": f"batch 1 ({rows} output vectors)" if rows else "per output vector",
            "weight_error": None if weight_error is None else round(weight_error, 6),
            "output_error": None if output_error is None else round(output_error, 6), "status": status}


def _factor_pairs(sites: list[Site], outputs: set[str]) -> dict[int, str]:
    """Sites that form a factor pair X·A·B (A with no bias, only consumer B, inner dim below both outer dims)."""
    by_node = {id(s.node): s for s in sites}
    out: dict[int, str] = {}
    for first in sites:
        h = first.node.outputs[0]
        if first.has_bias or h.name in outputs or len(h.outputs) != 1:
            continue
        second = by_node.get(id(h.outputs[0]))
        if second is None or second.x is not h or second.node.op != first.node.op:
            continue
        k, r = _feature_dims(first)
        r2, n = _feature_dims(second)
        if r == r2 and r < min(k, n):
            why = f"already a low-rank pair ({k}->{r}->{n}: '{first.name}', '{second.name}')"
            out[id(first)] = out[id(second)] = why
    return out


def _rows_per_run(graph: gs.Graph, ctx: PassContext, nodes: list[gs.Node]) -> dict[int, int]:
    """Output vectors each node computes in one run at batch 1 (symbolic dims taken as 1), from shape inference."""
    if not nodes:
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(export(graph, ctx.original))
    except Exception:
        return {}
    shapes: dict[str, list[int]] = {}
    for vi in (*model.graph.value_info, *model.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
    rows = {}
    for node in nodes:
        shape = shapes.get(node.outputs[0].name)
        if not shape:
            continue
        feature = 1 if node.op == "Conv" else len(shape) - 1
        rows[id(node)] = int(np.prod([d for i, d in enumerate(shape) if i != feature], dtype=np.int64))
    return rows


# ---------------------------------------------------------------------------------------------------- rewrite


def _unique(graph: gs.Graph, base: str) -> str:
    names = graph.tensors().keys() | {n.name for n in graph.nodes}
    name, i = base, 1
    while name in names:
        i += 1
        name = f"{base}_{i}"
    return name


def _splice(graph: gs.Graph, site: Site, a: np.ndarray, b: np.ndarray) -> None:
    """Replace the site's weight by factors: a new first node x -> h, the original node turned into h -> y."""
    node, dtype = site.node, np.asarray(site.weight.values).dtype
    wname = site.weight.name
    out = node.outputs[0]
    h = gs.Variable(_unique(graph, f"{out.name}_svd"), dtype=out.dtype)
    attrs: dict[str, Any] = {}
    if node.op == "Gemm":
        trans_b = node.attrs.get("transB", 0)
        w1, w2 = (a.T, b.T) if trans_b else (a, b)
        attrs = {"transA": node.attrs.get("transA", 0), "transB": trans_b}
        node.attrs["transA"] = 0
    elif node.op == "MatMul":
        w1, w2 = a, b
    else:  # Conv: weights [out, in, 1, ...]
        ones = [1] * (np.asarray(site.weight.values).ndim - 2)
        w1 = a.T.reshape(a.shape[1], a.shape[0], *ones)
        w2 = b.T.reshape(b.shape[1], b.shape[0], *ones)
        attrs = {key: v for key, v in node.attrs.items() if key in ("strides", "pads", "auto_pad", "dilations")}
        attrs["kernel_shape"] = ones
        for key in ("strides", "pads", "auto_pad", "dilations"):
            node.attrs.pop(key, None)
        if "kernel_shape" in node.attrs:
            node.attrs["kernel_shape"] = ones
    c1 = gs.Constant(_unique(graph, f"{wname}_svd_a"), np.ascontiguousarray(w1.astype(dtype)))
    c2 = gs.Constant(_unique(graph, f"{wname}_svd_b"), np.ascontiguousarray(w2.astype(dtype)))
    inputs = [site.x, c1]
    if node.op == "Gemm" and graph.opset < 11:
        inputs.append(gs.Constant(_unique(graph, f"{wname}_svd_zero"), np.zeros((1,), dtype)))
    first = gs.Node(node.op, name=_unique(graph, f"{site.name}_svd_a"), attrs=attrs, inputs=inputs, outputs=[h],
                    domain=node.domain)
    node.inputs[0] = h
    node.inputs[1] = c2
    graph.nodes.append(first)
