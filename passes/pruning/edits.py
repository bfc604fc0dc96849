"""Pruning edits as data: the records the channel analysis emits, the plan that lists them, and ``apply``.

Every record names a node (``site``, for printing; the node itself for applying) and the *tensor whose keep mask
decides it*: a boolean mask over that tensor's channel positions, True where the channel stays. With ``keep`` the
masks of the tensors that lose channels, ``apply`` performs each record whose tensor has a mask, in order:
  * ``SliceConst``: constant input ``index`` becomes ``compress(mask, value, axis)`` (weights on their in- or
    out-channel axis, biases, BN parameters, per-channel constants);
  * ``SetCount``: an integer list (a constant input, or an attribute) gets ``times · sum(mask[:stop])`` at ``pos``
    (the channel entry of a Reshape shape, Resize sizes or Expand shape; a Slice bound: the channels kept before
    it), or a scalar attribute becomes that count (a depthwise Conv's ``group``);
  * ``SetSplit``: a Split on the channel axis gets, per output, the channels kept in its range ``[b_i, b_i+1)``.
New constants are named after the old ones with ``_pruned`` (``w`` -> ``w_pruned``, ``w_pruned2``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs
from graphopt.passes.base import constant


@dataclass(frozen=True)
class SliceConst:
    """Constant input ``index`` (named ``const``) of ``node`` keeps, on ``axis``, the positions ``tensor`` keeps."""

    node: gs.Node = field(compare=False, repr=False)
    site: str
    index: int
    const: str
    axis: int
    tensor: str

    def __str__(self) -> str:
        return f"slice {self.site} input {self.index} '{self.const}' on axis {self.axis} by '{self.tensor}'"


@dataclass(frozen=True)
class SetCount:
    """``target`` of ``node`` (an input index: a constant; a name: an attribute) becomes ``values`` with entry
    ``pos`` set to ``times`` x the channels of ``tensor`` kept before ``stop`` (all if None); ``values`` None: the
    attribute is that count."""

    node: gs.Node = field(compare=False, repr=False)
    site: str
    target: int | str
    values: tuple[int, ...] | None
    pos: int
    tensor: str
    stop: int | None = None
    times: int = 1

    def __str__(self) -> str:
        where = f"input {self.target}" if isinstance(self.target, int) else f"attribute {self.target}"
        count = f"{self.times} x " if self.times != 1 else ""
        kept = f"the channels of '{self.tensor}' kept" + ("" if self.stop is None else f" before {self.stop}")
        if self.values is None:
            return f"set {self.site} {where} to {count}{kept}"
        return f"set {self.site} {where} {list(self.values)} at {self.pos} to {count}{kept}"

    def count(self, mask: np.ndarray) -> int:
        return int(mask[:self.stop].sum()) * self.times


@dataclass(frozen=True)
class SetSplit:
    """A Split of ``tensor`` on the channel axis: output i gets the kept channels in ``[bounds[i], bounds[i+1])``;
    ``as_input``: the sizes become a constant input (opset >= 13), else the ``split`` attribute."""

    node: gs.Node = field(compare=False, repr=False)
    site: str
    tensor: str
    bounds: tuple[int, ...]
    as_input: bool

    def __str__(self) -> str:
        sizes = [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        return f"set {self.site} split sizes {sizes} to the channels of '{self.tensor}' kept in each range"


Edit = Union[SliceConst, SetCount, SetSplit]


class Names:
    """Fresh tensor names for new constants: ``base_pruned``, ``base_pruned2``, ... never used in the graph."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors())

    def fresh(self, base: str) -> str:
        name, i = f"{base}_pruned", 1
        while name in self.used:
            i += 1
            name = f"{base}_pruned{i}"
        self.used.add(name)
        return name


def apply(edits: Sequence[Edit], keep: Mapping[str, np.ndarray], names: Names) -> None:
    """Perform, in order, every edit whose tensor loses channels (has a mask in ``keep``)."""
    for e in edits:
        mask = keep.get(e.tensor)
        if mask is None:
            continue
        node = e.node
        if isinstance(e, SliceConst):
            c = node.inputs[e.index]
            v = np.compress(mask, np.asarray(c.values), e.axis)
            node.inputs[e.index] = constant(names.fresh(c.name), v)
        elif isinstance(e, SetCount):
            n = e.count(mask)
            if e.values is None:
                node.attrs[e.target] = n
                continue
            values = [n if i == e.pos else v for i, v in enumerate(e.values)]
            if isinstance(e.target, str):
                node.attrs[e.target] = values
            else:
                c = node.inputs[e.target]
                node.inputs[e.target] = constant(names.fresh(c.name if c.name else node.name), values, np.int64)
        else:
            _set_split(e, mask, names)


def _set_split(e: SetSplit, mask: np.ndarray, names: Names) -> None:
    node = e.node
    new = [int(mask[lo:hi].sum()) for lo, hi in zip(e.bounds[:-1], e.bounds[1:])]
    node.attrs.pop("num_outputs", None)
    if not e.as_input:
        node.attrs["split"] = new
        return
    node.attrs.pop("split", None)
    c = constant(names.fresh((node.name or e.tensor) + "_split"), new, np.int64)
    if len(node.inputs) > 1:
        node.inputs[1] = c
    else:
        node.inputs.append(c)


@dataclass(frozen=True)
class Plan:
    """What pruning will do: per group the channels removed, the edits that apply (in order), the keep masks,
    and the output tensors of the layers whose input channels shrink (refitted by reconstruction)."""

    removed: tuple[tuple[str, tuple[str, ...], int, tuple[int, ...]], ...]   # group, layers, channels, removed
    edits: tuple[Edit, ...]
    keep: Mapping[str, np.ndarray]
    refit: tuple[str, ...]

    def lines(self) -> list[str]:
        out = [f"group '{g}' ({', '.join(layers)}): remove {len(gone)} of {n} channels {list(gone)}"
               for g, layers, n, gone in self.removed]
        for e in self.edits:
            mask = self.keep[e.tensor]
            out.append(f"{e} (keeps {int(mask.sum())} of {len(mask)})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
