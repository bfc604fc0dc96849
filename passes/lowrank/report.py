"""The report's layers rows of the ``svd`` pass: per site its shape, rank, parameters and MACs before and after
(at batch 1 from shape inference: output vectors for a matrix site, output pixels for a k×k Conv; per vector or pixel
when shapes are unknown), its relative weight error and its relative output error on the calibration data."""

from __future__ import annotations

from typing import Any

from .conv import ConvFactors
from .convsite import ConvSite
from .sites import Site

def matrix_row(site: Site, *, status: str, rank: int | None = None, rows: int | None = None,
         weight_error: float | None = None, output_error: float | None = None) -> dict[str, Any]:
    """The report's layers row of a site: shape, rank, params and MACs before/after, errors, status."""
    k, n = site.dims
    per = rows or 1
    after = rank * (k + n) if rank is not None and status == "factorized" else k * n
    return {"layer": site.name, "op": site.node.op, "shape": f"{k}x{n}", "rank": rank,
            "params_before": k * n, "params_after": after,
            "macs_before": k * n * per, "macs_after": after * per,
            "macs_basis": f"batch 1 ({rows} output vectors)" if rows else "per output vector",
            "weight_error": None if weight_error is None else round(weight_error, 6),
            "output_error": None if output_error is None else round(output_error, 6), "status": status}


def conv_row(site: ConvSite, f: ConvFactors | None = None, *, status: str, rows: int | None = None,
              weight_error: float | None = None, output_error: float | None = None) -> dict[str, Any]:
    """The report's layers row of a k×k Conv site (MACs per output pixel times the pixels at batch 1)."""
    dense = site.size
    per = rows or 1
    done = f is not None and status == "factorized"
    return {"layer": site.name, "op": "Conv", "shape": "x".join(map(str, site.shape)),
            "rank": None if f is None else f"{f.kind} {f.rank_text}",
            "params_before": dense, "params_after": f.params if done else dense,
            "macs_before": dense * per, "macs_after": round(f.macs * per) if done else dense * per,
            "macs_basis": f"batch 1 ({rows} output pixels)" if rows else "per output pixel",
            "weight_error": None if weight_error is None else round(weight_error, 6),
            "output_error": None if output_error is None else round(output_error, 6), "status": status}
