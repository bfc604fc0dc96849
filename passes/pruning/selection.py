"""Which channels to remove: per group, the lowest-importance classes, and the plan that follows from them.

``scope=layer``: a group of C channels with ratio r (``ratio``, or the first matching ``layers=NAME:RATIO``) keeps
``C - floor(r·C)``. ``scope=global``: every channel of the groups without a per-layer ratio is ranked by importance
(mean 1 per group) and the lowest ``floor(ratio · total)`` are removed, each group keeping at least
``min-channels``. The kept count is then rounded: where C >= q (``round-to``; ``auto`` = onnxruntime's NCHWc
convolution block on this CPU, 16 with AVX-512F else 8: a layer cut off that block runs about as long as before,
32 -> 24 channels on AVX-512 runs as 32; measured on AVX-512, 16 meets "latency reduction >= 0.7 x MAC reduction"
in 15 of 15 model/ratio pairs and 8 in 6, benchmarks/results/prune.md), to the nearest multiple of q at least
``min-channels`` (ties keep more), or to C when C is nearer; a group asked to keep everything is never pruned by
rounding, and a group of exactly q channels is not pruned. The removed classes are the lowest-scored (stable
order). No tensor may lose all its channels (a Slice or Split piece inside one group): its best channel goes back.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping

import numpy as np

from graphopt.passes.base import PassResult
from graphopt.runtime import cpu_info

from .analysis import Analysis, keep_masks
from .channels import Group
from .config import (CHANNELS_IN_PRUNABLE_GROUPS, CHANNELS_REMOVED, GROUPS, GROUPS_PRUNED, Options,
                     parse_layer_ratio)
from .edits import Plan
from .importance import importance


def conv_block() -> int:
    """Channels per block of onnxruntime's NCHWc float convolutions on this CPU (MlasNchwcGetBlockSize): 16 with
    AVX-512F, 8 otherwise."""
    return 16 if "AVX-512" in cpu_info()["isa"] else 8


def _matches(patterns: tuple[str, ...] | list[str], group: Group) -> bool:
    names = [s.node.name for s in group.sources if s.node is not None and s.node.name]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _row(g: Group, before: int, after: int, status: str) -> dict[str, Any]:
    return {"group": g.name, "layers": [s.name for s in g.sources if not s.fixed], "channels": before,
            "kept": after, "status": status}


def round_keep(o: Options, c: int, keep: int) -> int:
    """The kept count of a group of ``c`` channels asked to keep ``keep``, after min-channels and round-to."""
    if keep >= c:
        return c            # nothing asked: never let rounding prune
    lo = min(c, max(o.min_channels, 1))
    keep = min(c, max(keep, lo))
    q = conv_block() if o.round_to == "auto" else o.round_to
    if q > 1 and c >= q:
        # the nearest multiple of q (ties keep more); c itself when that is nearer or no multiple fits
        r = max(q, q * int(math.floor(keep / q + 0.5)))
        while r < lo:
            r += q
        keep = c if r >= c or (c - keep) <= abs(keep - r) else r
    return keep


def _lowest(g: Group, scores: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return g.classes[:0]
    order = np.argsort(scores, kind="stable")
    return g.classes[order[:n]]


def find_candidates(an: Analysis, o: Options, res: PassResult) -> list[tuple[Group, float | None]]:
    """The groups that may be pruned, each with its per-layer ratio (None: the pass's); declines the others."""
    per_layer = [parse_layer_ratio(x) for x in o.layers]
    for layer, reason in an.unpruned:
        res.decline(layer, f"output channels not prunable: {reason}")
    candidates: list[tuple[Group, float | None]] = []
    for g in an.groups:
        site = f"group '{g.name}'" + (f" (+{len(g.sources) - 1} coupled)" if len(g.sources) > 1 else "")
        if g.blocked:
            res.decline(site, "; ".join(g.blocked[:3]) + (f"; +{len(g.blocked) - 3} more"
                                                             if len(g.blocked) > 3 else ""))
            res.layers.append(_row(g, len(g.classes), len(g.classes), "declined"))
            continue
        if o.exclude and _matches(o.exclude, g):
            res.decline(site, "excluded by option")
            res.layers.append(_row(g, len(g.classes), len(g.classes), "excluded"))
            continue
        ratio = next((r for pat, r in per_layer if _matches([pat], g)), None)
        candidates.append((g, ratio))
    return candidates


def _global(o: Options, pool: list[Group], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """scope=global: the lowest ``ratio`` of all the pool's channels, each group keeping ``min-channels``."""
    if not pool or o.ratio <= 0:
        return {g.index: g.classes[:0] for g in pool}
    target = int(math.floor(o.ratio * sum(len(g.classes) for g in pool) + 1e-9))
    owner = np.concatenate([np.full(len(g.classes), i) for i, g in enumerate(pool)])
    order = np.argsort(np.concatenate([scores[g.index] for g in pool]), kind="stable")
    counts = [0] * len(pool)
    limit = [len(g.classes) - max(o.min_channels, 1) for g in pool]
    taken = 0
    for j in order:
        if taken >= target:
            break
        i = int(owner[j])
        if counts[i] < limit[i]:
            counts[i] += 1
            taken += 1
    chosen = {}
    for i, g in enumerate(pool):
        keep = round_keep(o, len(g.classes), len(g.classes) - counts[i])
        chosen[g.index] = _lowest(g, scores[g.index], len(g.classes) - keep)
    return chosen


def select(an: Analysis, o: Options, res: PassResult, ratios: Mapping[str, float] | None = None
           ) -> dict[int, np.ndarray]:
    """Per candidate group index, the union-find roots of the channels to remove; fills the report's layers,
    declines, notes and counts. ``ratios`` (group name -> ratio, 0 for a group it does not name) replaces the
    options' ratios: ratio=auto's allocation."""
    candidates = [(g, ratios.get(g.name, 0.0) if ratios is not None else r) for g, r in find_candidates(an, o, res)]
    scores, fallback = importance(an, [g for g, _ in candidates], o.criterion)
    if fallback:
        res.notes.append(f"criterion bn-gamma: {len(fallback)} group(s) without BatchNormalization use l2 "
                         f"({', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''})")
    chosen: dict[int, np.ndarray] = {}
    pool = []
    for g, ratio in candidates:
        if ratio is None and o.scope == "global":
            pool.append(g)
            continue
        r = o.ratio if ratio is None else ratio
        keep = round_keep(o, len(g.classes), len(g.classes) - int(math.floor(r * len(g.classes) + 1e-9)))
        chosen[g.index] = _lowest(g, scores[g.index], len(g.classes) - keep)
    chosen.update(_global(o, pool, scores))
    _no_empty_tensors(an, chosen, scores)
    for g, _ in candidates:
        n = len(g.classes)
        res.layers.append(_row(g, n, n - len(chosen[g.index]), "pruned" if len(chosen[g.index]) else "kept"))
    res.counts[GROUPS] = len(an.groups)
    res.counts[GROUPS_PRUNED] = sum(1 for g, _ in candidates if len(chosen[g.index]))
    res.counts[CHANNELS_REMOVED] = sum(len(chosen[g.index]) for g, _ in candidates)
    res.counts[CHANNELS_IN_PRUNABLE_GROUPS] = sum(len(g.classes) for g, _ in candidates)
    return chosen


def _no_empty_tensors(an: Analysis, chosen: dict[int, np.ndarray], scores: dict[int, np.ndarray]) -> None:
    """No tensor may lose all its channels (a Slice or Split piece inside one group): put back its best channel."""
    group_of = {}
    for g in an.groups:
        for k, c in enumerate(g.classes.tolist()):
            group_of[c] = (g.index, k)
    while True:
        pruned = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, np.int64)
        if pruned.size == 0:
            return
        pset = set(pruned.tolist())
        fixed = False
        for ids in an.ids.values():
            roots = an.root[ids]
            if len(roots) and all(r in pset for r in roots.tolist()):
                best = max(set(roots.tolist()), key=lambda r: scores[group_of[r][0]][group_of[r][1]])
                gi = group_of[best][0]
                chosen[gi] = chosen[gi][chosen[gi] != best]
                fixed = True
                break
        if not fixed:
            return


def make_plan(an: Analysis, chosen: dict[int, np.ndarray]) -> Plan:
    """The plan for removing ``chosen``: removed channel positions per group, the edits that apply, keep masks,
    and the layers to refit."""
    removed = [v for v in chosen.values() if len(v)]
    masks = keep_masks(an, np.concatenate(removed) if removed else np.zeros(0, np.int64))
    groups = tuple((g.name, tuple(g.layers), len(g.classes),
                    tuple(int(k) for k in np.flatnonzero(np.isin(g.classes, chosen[g.index]))))
                   for g in an.groups if g.index in chosen and len(chosen[g.index]))
    edits = tuple(e for e in an.edits if e.tensor in masks)
    refit = tuple(dict.fromkeys(c.node.outputs[0].name for c in an.consumers if c.tensor in masks))
    return Plan(groups, edits, masks, refit)
