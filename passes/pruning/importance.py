"""Channel importance: one score per prunable channel (union-find class) of a group, from every coupled tensor.

Each importance term is a weight tensor whose slices on one axis belong to channel positions (``Term``). Per term
and class, its p-norm (``l1``: sum |w|; ``l2``: sqrt(sum w²)) over the slices of the class's positions is divided by
the term's mean over its classes (so a big layer does not outweigh a small one), then summed per kind:
  * ``out``: the filters producing the channel (times |γ/√(σ²+ε)| of a BN that alone reads the layer, squared
    for l2), ``in``: the weight columns of the layers reading it;
  * ``l1`` / ``l2``: importance = out x in (a product: a channel that is zero or that nothing reads scores 0);
  * ``bn-gamma``: sum of |γ| of the BatchNormalizations on the channel ("bn" terms); a group without BN falls back
    to the l2 product.
Within a group the scores are finally divided by their mean (mean 1), so groups compare in ``scope=global``.
"""

from __future__ import annotations

import numpy as np

from .analysis import Analysis
from .channels import Group, Term


def importance(an: Analysis, groups: list[Group], criterion: str) -> tuple[dict[int, np.ndarray], list[str]]:
    """Per group, the importance of each class (aligned with ``group.classes``), normalised to mean 1; and the
    groups that fell back from bn-gamma to l2."""
    p = 1 if criterion == "l1" else 2
    norms = {kind: np.zeros(len(an.root)) for kind in ("out", "in", "bn")}
    for term in an.terms:
        _accumulate(an, term, p, norms[term.kind])
    has_bn = np.zeros(len(an.root), bool)
    for term in an.terms:
        if term.kind == "bn":
            has_bn[an.root[term.ids]] = True
    result: dict[int, np.ndarray] = {}
    fallback: list[str] = []
    for g in groups:
        if criterion == "bn-gamma" and has_bn[g.classes].any():
            s = norms["bn"][g.classes]
        else:
            if criterion == "bn-gamma":
                fallback.append(g.name)     # no BatchNormalization in the group: l2 (bn-gamma sides are l2)
            s = norms["out"][g.classes] * norms["in"][g.classes]
        mean = float(s.mean()) if s.size else 0.0
        result[g.index] = s / mean if mean > 0 else s
    return result, fallback


def _accumulate(an: Analysis, term: Term, p: int, side: np.ndarray) -> None:
    """Add one tensor's per-class norms (normalised by their mean) to ``side`` (indexed by union-find root)."""
    v = np.moveaxis(np.asarray(term.values, np.float64), term.axis, 0).reshape(len(term.ids), -1)
    per_pos = np.abs(v).sum(1) if p == 1 else (v * v).sum(1)
    if term.kind == "bn":
        per_pos = np.abs(v[:, 0])
    elif term.scale is not None and len(term.scale) == len(per_pos):
        per_pos = per_pos * (term.scale if p == 1 else term.scale ** 2)
    roots = an.root[term.ids]
    uniq, inv = np.unique(roots, return_inverse=True)
    agg = np.zeros(len(uniq))
    np.add.at(agg, inv, per_pos)
    if p == 2 and term.kind != "bn":
        agg = np.sqrt(agg)
    mean = agg.mean() if agg.size else 0.0
    if mean > 0:
        side[uniq] += agg / mean
