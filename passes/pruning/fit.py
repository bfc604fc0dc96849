"""Reconstruction of one layer: streaming ridge least squares from calibration data (``Fit`` and its subclasses).

A layer computing ``y = x W + b`` on rows x (Gemm/MatMul: the features; Conv: im2col patches of the input, one
row per sampled output position; ConvTranspose with kernel = stride: one input pixel, its kernel phases as
``phases x C_out`` columns) is refitted so that its output on the pruned model's inputs A matches the teacher's
output Y. Over calibration batches it accumulates AᵀA and AᵀY (float32 products, float64 sums; A gets a column
of ones for the bias) and ΣY², then solves the ridge system ``(AᵀA + λD) W = AᵀY + λD W0``, towards the pruned
weights W0, with λ = damping · mean diag(AᵀA) and D the identity without the bias entry. The relative RMS error
``sqrt((WᵀAᵀAW - 2 tr(WᵀAᵀY) + ΣY²) / ΣY²)`` is reported before (W0) and after; a solution that is not finite
or not better is dropped (W0 kept). ConvTranspose shares one bias over its phases: the phases' mean, with the
weights solved again for it. A MatMul whose bias sits in the one Add reading it is fitted with that bias (the
Add's output is the target) and the Add's constant is rewritten.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import is_std, node_name
from graphopt.passes.base import constant

from .edits import Names


class Fit:
    """Streaming ridge least squares for one Conv (1-D/2-D, group 1) or Gemm/MatMul (rank-2, constant weight)."""

    def __init__(self, node: gs.Node, w: np.ndarray, b: np.ndarray | None, bias: bool) -> None:
        self.node = node
        self.w0 = w                   # as fitted: [K, M]
        self.b0 = b                   # [M] or None
        self.bias = bias
        k = w.shape[0] + (1 if bias else 0)
        self.ata = np.zeros((k, k))
        self.aty = np.zeros((k, w.shape[1]))
        self.yy = 0.0
        self.rows = 0
        self.sol: np.ndarray | None = None
        self.target = node.outputs[0].name            # the teacher tensor the layer's output must match
        self.bias_add: tuple[gs.Node, int] | None = None   # MatMul: the Add that holds its bias

    @staticmethod
    def make(node: gs.Node) -> "Fit | str":
        w_t = node.inputs[1]
        if not isinstance(w_t, gs.Constant):
            return "weight is not a constant"
        w = np.asarray(w_t.values, np.float64)
        b_t = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if node.op == "Conv":
            if int(node.attrs.get("group", 1)) != 1 or w.ndim not in (3, 4):
                return "only 1-D/2-D Conv with group 1 is refitted"
            m = w.shape[0]
            b = np.asarray(b_t.values, np.float64) if b_t is not None else np.zeros(m)
            fit = ConvFit(node, w.reshape(m, -1).T, b, True)
            fit.kernel = w.shape[2:]
            return fit
        if node.op == "ConvTranspose":
            why = ConvTFit.unsupported(node, w)
            if why:
                return why
            c_in, c_out, phases = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
            b = np.asarray(b_t.values, np.float64) if b_t is not None else np.zeros(c_out)
            wk = w.reshape(c_in, c_out, phases).transpose(0, 2, 1).reshape(c_in, phases * c_out)
            tfit = ConvTFit(node, wk, np.tile(b, phases), True)
            tfit.kernel, tfit.c_out = tuple(w.shape[2:]), c_out
            return tfit
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                return "transA=1"
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            wk = (w.T if node.attrs.get("transB", 0) else w) * alpha
            m = wk.shape[1]
            if b_t is not None:
                bv = np.asarray(b_t.values, np.float64) * beta
                if bv.size not in (1, m) or (bv.ndim == 2 and bv.shape[0] != 1):
                    return f"bias of shape {list(bv.shape)}"
                b = np.broadcast_to(bv.reshape(-1), (m,)).copy()
            else:
                b = np.zeros(m)
            return Fit(node, wk, b, True)
        if node.op == "MatMul":
            add, index = _bias_add(node, w.shape[1])
            if add is None:
                return Fit(node, w, None, False)
            bv = np.asarray(add.inputs[index].values, np.float64).reshape(-1)
            fit = Fit(node, w, np.broadcast_to(bv, (w.shape[1],)).copy(), True)
            fit.bias_add = (add, index)
            fit.target = add.outputs[0].name
            return fit
        return f"{node.op} is not refitted"

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        x = x.reshape(-1, x.shape[-1])        # MatMul on [.., T, K]: every position is a row
        y = y.reshape(-1, y.shape[-1])
        if x.shape[0] > cap:
            pick = rng.choice(x.shape[0], cap, replace=False)
            x, y = x[pick], y[pick]
        return x, y

    def update(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int) -> None:
        """Add one batch: products in float32 (BLAS), sums kept in float64; the bias column handled apart."""
        a, yy = self.rows_of(x, y, rng, cap)
        a32, y32 = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(yy, np.float32)
        k = a.shape[1]
        self.ata[:k, :k] += a32.T @ a32
        self.aty[:k] += a32.T @ y32
        if self.bias:
            sa = a.sum(0, dtype=np.float64)
            self.ata[k, :k] += sa
            self.ata[:k, k] += sa
            self.ata[k, k] += a.shape[0]
            self.aty[k] += yy.sum(0, dtype=np.float64)
        self.yy += float(np.square(yy, dtype=np.float64).sum())
        self.rows += a.shape[0]

    def _w0(self) -> np.ndarray:
        return np.vstack([self.w0, self.b0[None, :]]) if self.bias else self.w0

    def _err(self, w: np.ndarray) -> float:
        e = float(np.einsum("ij,ik,kj->", w, self.ata, w) - 2 * np.einsum("ij,ij->", w, self.aty) + self.yy)
        return math.sqrt(max(e, 0.0) / self.yy) if self.yy > 0 else 0.0

    def solve(self, damping: float) -> tuple[float, float]:
        w0 = self._w0()
        k = self.w0.shape[0]
        d = np.ones(self.ata.shape[0])
        if self.bias:
            d[-1] = 0.0
        lam = damping * float(np.mean(np.diag(self.ata)[:k])) if k else 0.0
        a = self.ata + np.diag(lam * d)
        rhs = self.aty + (lam * d)[:, None] * w0
        if self.bias and self.rows:
            a[-1, -1] += 1e-12 * self.rows
        try:
            sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        before, after = self._err(w0), self._err(sol)
        if not np.all(np.isfinite(sol)) or after > before:
            sol, after = w0, before
        self.sol = sol
        return before, after

    def write(self, names: Names) -> None:
        """Put the solution into the graph: new weight (and bias, or the bias Add's constant) constants."""
        assert self.sol is not None
        node = self.node
        k = self.w0.shape[0]
        w, b = self.sol[:k], (self.sol[k] if self.bias else None)
        w_t = node.inputs[1]
        dtype = np.asarray(w_t.values).dtype
        if node.op == "Conv":
            shape = np.asarray(w_t.values).shape
            new_w = w.T.reshape(shape)
        elif node.op == "ConvTranspose":
            shape = np.asarray(w_t.values).shape
            new_w = w.reshape(shape[0], -1, shape[1]).transpose(0, 2, 1).reshape(shape)
            b = b[:shape[1]] if b is not None else None     # one bias, shared by every phase
        elif node.op == "Gemm":
            new_w = w.T if node.attrs.get("transB", 0) else w
            node.attrs["alpha"] = 1.0
            node.attrs["beta"] = 1.0
        else:
            new_w = w
        node.inputs[1] = constant(names.fresh(w_t.name), new_w, dtype)
        if b is not None and self.bias_add is not None:
            add, index = self.bias_add
            old = add.inputs[index]
            shape = np.asarray(old.values).shape
            add.inputs[index] = constant(names.fresh(old.name), b.reshape(shape), dtype)
        elif b is not None:
            b_old = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
            base = b_old.name if b_old is not None else node_name(node) + "_bias"
            c = constant(names.fresh(base), b, dtype)
            if len(node.inputs) > 2:
                node.inputs[2] = c
            else:
                node.inputs.append(c)


def _bias_add(node: gs.Node, m: int) -> tuple[gs.Node | None, int]:
    """The Add of a constant bias ([M] or [1, M]) that alone reads a MatMul's output (exporters split Gemm so)."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None, 0
    add = out.outputs[0]
    if not is_std(add, "Add") or len(add.inputs) != 2:
        return None, 0
    index = 1 if add.inputs[0] is out else 0
    c = add.inputs[index]
    if not isinstance(c, gs.Constant) or np.asarray(c.values).dtype.kind != "f":
        return None, 0
    shape = np.asarray(c.values).shape
    if shape not in ((m,), (1, m)):
        return None, 0
    return add, index


class ConvFit(Fit):
    kernel: tuple[int, ...] = ()

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        node = self.node
        if x.ndim == 3:                                   # Conv1d as 2-D with H = 1
            x, y = x[:, :, None, :], y[:, :, None, :]
        kernel = tuple(self.kernel) if len(self.kernel) == 2 else (1, *self.kernel)
        nd = len(self.kernel)
        strides = list(node.attrs.get("strides", [1] * nd))
        dil = list(node.attrs.get("dilations", [1] * nd))
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        auto = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto, bytes):
            auto = auto.decode()
        if nd == 1:
            strides, dil, pads = [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
        n, c, h, w = x.shape
        ho, wo = y.shape[2], y.shape[3]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for i, (size, out, k, s, d) in enumerate(zip((h, w), (ho, wo), kernel, strides, dil)):
                total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
                small, big = total // 2, total - total // 2
                pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
        elif auto == "VALID":
            pads = [0, 0, 0, 0]
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        total = n * ho * wo
        pick = rng.choice(total, cap, replace=False) if total > cap else np.arange(total)
        bi, rest = np.divmod(pick, ho * wo)
        oi, oj = np.divmod(rest, wo)
        cols = np.empty((len(pick), c, kernel[0], kernel[1]), dtype=np.float32)
        for a in range(kernel[0]):
            for b in range(kernel[1]):
                cols[:, :, a, b] = xp[bi, :, oi * strides[0] + a * dil[0], oj * strides[1] + b * dil[1]]
        ys = y[bi, :, oi, oj]
        return cols.reshape(len(pick), -1), ys


class ConvTFit(Fit):
    """ConvTranspose whose kernel equals its stride (2x2 stride 2 upsampling: DB heads, U-Nets): every output pixel
    reads one input pixel, so each of the kernel's phases (a, b) is a linear map of the same input rows. The weight is
    fitted as [C_in, phases·C_out] columns, then the bias is shared: the mean of the phases' biases, with the
    weights refitted for it."""

    kernel: tuple[int, ...] = ()
    c_out: int = 0

    @staticmethod
    def unsupported(node: gs.Node, w: np.ndarray) -> str | None:
        nd = w.ndim - 2
        if nd not in (1, 2) or int(node.attrs.get("group", 1)) != 1:
            return "only 1-D/2-D ConvTranspose with group 1 is refitted"
        k = list(w.shape[2:])
        auto = node.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if (list(node.attrs.get("strides", [1] * nd)) != k or any(node.attrs.get("pads", [0] * 2 * nd))
                or any(d != 1 for d in node.attrs.get("dilations", [1] * nd))
                or any(node.attrs.get("output_padding", [0] * nd)) or "output_shape" in node.attrs
                or auto not in ("NOTSET", "VALID")):
            return "ConvTranspose refitted only when its kernel equals its stride (no padding or dilation)"
        return None

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        kernel = self.kernel if len(self.kernel) == 2 else (1, *self.kernel)
        if x.ndim == 3:
            x, y = x[:, :, None, :], y[:, :, None, :]
        n, _, h, w = x.shape
        total = n * h * w
        pick = rng.choice(total, cap, replace=False) if total > cap else np.arange(total)
        bi, rest = np.divmod(pick, h * w)
        i, j = np.divmod(rest, w)
        xs = x[bi, :, i, j]
        ys = np.concatenate([y[bi, :, i * kernel[0] + a, j * kernel[1] + b]
                             for a in range(kernel[0]) for b in range(kernel[1])], axis=1)
        return xs, ys

    def solve(self, damping: float) -> tuple[float, float]:
        before, _ = super().solve(damping)
        assert self.sol is not None
        k, c = self.w0.shape[0], self.c_out
        bias = np.tile(self.sol[k].reshape(-1, c).mean(0), self.sol.shape[1] // c)
        lam = damping * float(np.mean(np.diag(self.ata)[:k])) if k else 0.0
        rhs = self.aty[:k] - self.ata[:k, k:k + 1] * bias[None, :] + lam * self.w0
        try:
            w = np.linalg.solve(self.ata[:k, :k] + lam * np.eye(k), rhs)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(self.ata[:k, :k] + lam * np.eye(k), rhs, rcond=None)[0]
        sol = np.vstack([w, bias[None, :]])
        after = self._err(sol)
        if not np.all(np.isfinite(sol)) or after > before:
            sol, after = self._w0(), before
        self.sol = sol
        return before, after
