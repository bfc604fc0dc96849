"""The state of the channel analysis while it walks the graph, and the table of per-op handlers that fill it.

Every *prunable layer* creates fresh channel *atoms*, one per output channel. Each tensor that carries channels on
axis 1 gets an array ``ids`` naming the atom behind each of its channel positions (``fmaps``: the atom of every
element of dims[1:] for a tensor whose channels a Transpose moved off axis 1). Coupled atoms (operands of a residual
Add, ...) are united in a union-find: a union-find *class* is one prunable channel, removed everywhere at once.
Atoms whose origin is not a prunable layer are *fixed*; anything the analysis cannot follow *blocks* the sources of
the atoms it sees, with the reason.

A handler ``(cg, node) -> set of input indices it followed`` is registered per op type with ``@handles``; it sets
the ids of the node's outputs, emits the node's edit records (``cg.edits``, see ``edits``), importance terms and
consumers, and raises ``Blocked`` with the reason when it cannot follow the channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe

from .edits import Edit, SliceConst


class Blocked(Exception):
    """The channels reaching a node cannot be followed through it; the message is the reason."""


class UnionFind:
    """Disjoint sets over 0..n-1 (grown with ``grow``); the representative of a set is its smallest member."""

    def __init__(self, n: int = 0) -> None:
        self.parent = list(range(n))

    def __len__(self) -> int:
        return len(self.parent)

    def grow(self, n: int) -> None:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(a) for a in range(len(self.parent))], dtype=np.int64)


@dataclass
class Source:
    """A channel space: a prunable layer's output channels, or channels of fixed origin (``fixed`` says why)."""

    index: int
    node: gs.Node | None
    tensor: str
    start: int
    size: int
    fixed: str | None = None

    @property
    def name(self) -> str:
        if self.node is not None:
            return self.node.name or self.tensor
        return self.tensor


@dataclass
class Term:
    """Weights that measure importance: per channel position of ``ids``, the slice of ``values`` on ``axis``."""

    kind: str            # "out": sets the channel's magnitude; "in": a consumer's weights; "bn": a BN's gamma
    ids: np.ndarray
    values: np.ndarray
    axis: int
    scale: np.ndarray | None = None   # per-position factor (a BN after the producer)


@dataclass
class Consumer:
    """A weighted layer reading channel positions (its input channels shrink; reconstruction refits it)."""

    node: gs.Node
    tensor: str


@dataclass
class Group:
    """Layers whose channels are coupled; ``classes`` are its prunable channels (union-find roots)."""

    index: int
    sources: list[Source]
    classes: np.ndarray
    blocked: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sources[0].name

    @property
    def layers(self) -> list[str]:
        return [s.name for s in self.sources]


class ChannelGraph:
    """What the walk has found so far: atoms and their sources, tensor ids, blocks, edits, terms, consumers."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[Any] | None]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.opset = graph.opset
        self.ids: dict[str, np.ndarray] = {}
        self.fmaps: dict[str, np.ndarray] = {}
        self.atoms = UnionFind()
        self.atom_source: list[int] = []
        self.sources: list[Source] = []
        self.blocks: dict[int, list[str]] = {}
        self.edits: list[Edit] = []
        self.terms: list[Term] = []
        self.consumers: list[Consumer] = []
        self.unpruned: list[tuple[str, str]] = []

    def new_source(self, node: gs.Node | None, tensor: str, size: int, fixed: str | None = None) -> np.ndarray:
        start = len(self.atoms)
        idx = len(self.sources)
        self.sources.append(Source(idx, node, tensor, start, size, fixed))
        self.atoms.grow(size)
        self.atom_source.extend([idx] * size)
        if fixed:
            self.blocks.setdefault(idx, []).append(fixed)
        return np.arange(start, start + size, dtype=np.int64)

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        """The atoms at equal positions of ``a`` and ``b`` are one channel."""
        for x, y in zip(a.tolist(), b.tolist()):
            self.atoms.union(x, y)

    def block(self, ids: np.ndarray, reason: str) -> None:
        for s in sorted({self.atom_source[a] for a in np.unique(ids).tolist()}):
            reasons = self.blocks.setdefault(s, [])
            if reason not in reasons:
                reasons.append(reason)

    # -------------------------------------------------------------------------------------------- shapes

    def shape(self, t: gs.Tensor) -> list[Any] | None:
        if isinstance(t, gs.Constant):
            return list(t.values.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = list(t.shape)
        return s

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def channels_of(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        if s is None or len(s) < 2 or not isinstance(s[1], int) or s[1] <= 0:
            return None
        return s[1]

    def fixed_ids(self, t: gs.Tensor, why: str) -> np.ndarray:
        """Atoms for the channels of a tensor that no prunable layer produces (never pruned)."""
        if t.name in self.ids:
            return self.ids[t.name]
        c = self.channels_of(t)
        if c is None:
            raise Blocked(f"operand '{t.name}' has an unknown channel count")
        ids = self.new_source(None, t.name, c, fixed=why)
        self.ids[t.name] = ids
        return ids

    # ------------------------------------------------------------------------------------------- records

    def slice_const(self, node: gs.Node, index: int, axis: int, tensor: str) -> None:
        """Record: input ``index`` of ``node`` (a constant) loses the positions ``tensor`` loses, on ``axis``."""
        self.edits.append(SliceConst(node, describe(node), index, node.inputs[index].name, axis, tensor))

    def add_reader(self, node: gs.Node, x: gs.Tensor, ids: np.ndarray, weight: np.ndarray, axis: int) -> None:
        """Record: ``node`` reads the channels ``ids`` of ``x`` through its constant weight (input 1) on ``axis``:
        it is a consumer to reconstruct, the weight's slices count in the channels' importance, and they go with
        the channels."""
        self.consumers.append(Consumer(node, x.name))
        self.terms.append(Term("in", ids, weight, axis))
        self.slice_const(node, 1, axis, x.name)

    def axes_of(self, node: gs.Node, rank: int | None, input_index: int | None, attr: str = "axes"
                ) -> list[int] | None:
        """Normalised axes from the attribute or a constant input; None if absent; raises if not constant."""
        vals: Any = None
        if attr in node.attrs:
            vals = node.attrs[attr]
        elif input_index is not None and len(node.inputs) > input_index and not node.inputs[input_index].is_empty():
            v = const_value(node.inputs[input_index])
            if v is None:
                raise Blocked(f"{describe(node)}: axes are computed, not constant")
            vals = v.reshape(-1).tolist()
        if vals is None:
            return None
        if isinstance(vals, int):
            vals = [vals]
        if rank is None and any(a < 0 for a in vals):
            raise Blocked(f"{describe(node)}: negative axes with unknown rank")
        return [int(a) + (rank if a < 0 else 0) for a in vals]  # type: ignore[operator]


# --------------------------------------------------------------------------------------------- handlers

Handler = Callable[[ChannelGraph, gs.Node], "set[int]"]


@dataclass(frozen=True)
class Entry:
    """A registered handler; ``origin``: the op creates channels, so it is visited even when no input carries
    any."""

    fn: Handler
    origin: bool = False


HANDLERS: dict[str, Entry] = {}     # op type -> handler, for nodes reading tensors with channels on axis 1
MOVED: dict[str, Handler] = {}      # op type -> handler, for nodes reading channels a Transpose moved off axis 1


def handles(*ops: str, origin: bool = False) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``ops`` (default-domain nodes)."""

    def register(fn: Handler) -> Handler:
        for op in ops:
            if op in HANDLERS:
                raise ValueError(f"two channel handlers for {op}")
            HANDLERS[op] = Entry(fn, origin)
        return fn

    return register


def handles_moved(*ops: str) -> Callable[[Handler], Handler]:
    """Register the handler of ``ops`` reading a tensor whose channels a Transpose moved off axis 1."""

    def register(fn: Handler) -> Handler:
        for op in ops:
            MOVED[op] = fn
        return fn

    return register


def pass_through(cg: ChannelGraph, node: gs.Node, i: int = 0) -> set[int]:
    """The output carries input ``i``'s channels unchanged."""
    cg.ids[node.outputs[0].name] = cg.ids[node.inputs[i].name]
    return {i}
