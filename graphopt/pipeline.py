"""Pass interface, registry and pipeline: how rewrites plug into graphopt.

A pass is a class with a kebab-case ``name``, a one-line ``summary``, a frozen dataclass ``Options`` whose fields
are its CLI options (type, default, bounds and help in the field metadata via :func:`option`), and ``run(graph,
ctx) -> PassResult`` which rewrites an onnx-graphsurgeon graph in place. A site that does not qualify is skipped
with a reason recorded in the result (``result.decline``), never an exception.

The pipeline runs passes in the order given; after each one it removes dead nodes and unused initializers
(``cleanup``), sorts topologically, exports the graph and runs ``onnx.checker`` on it (``verify=False`` skips the
checker), and optionally dumps the model. It refuses orders that make no sense (a pass declares which passes it
must not follow, with the reason) before anything runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence

import onnx
import onnx_graphsurgeon as gs

from . import io
from .errors import GraphoptError, InputError, InternalError, UsageError, one_line

log = logging.getLogger("graphopt")


# ----------------------------------------------------------------------------------------------------- options


def option(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A pass option: a dataclass field carrying its help text and numeric bounds (closed unless ``*_open``)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    name: str        # CLI spelling, kebab-case
    attr: str        # dataclass attribute
    type: Any
    default: Any
    help: str
    lo: float | None
    hi: float | None
    lo_open: bool
    hi_open: bool

    @property
    def choices(self) -> tuple[Any, ...] | None:
        base = _strip_optional(self.type)
        if typing.get_origin(base) is Literal:
            return typing.get_args(base)
        return None

    @property
    def is_list(self) -> bool:
        return typing.get_origin(_strip_optional(self.type)) is tuple

    def type_name(self) -> str:
        base = _strip_optional(self.type)
        if self.choices is not None:
            name = "|".join(str(c) for c in self.choices)
        elif _is_union(base):   # e.g. int | Literal["auto"]
            name = "|".join("|".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                            else a.__name__ for a in typing.get_args(base))
        elif self.is_list:
            name = "list of " + typing.get_args(base)[0].__name__ + " (repeat the key)"
        else:
            name = base.__name__
        bounds = ""
        if self.lo is not None or self.hi is not None:
            left = ("(" if self.lo_open else "[") + ("-inf" if self.lo is None else _fmt(self.lo))
            right = ("inf" if self.hi is None else _fmt(self.hi)) + (")" if self.hi_open else "]")
            bounds = f" in {left}, {right}"
        return name + bounds + (" or none" if _is_optional(self.type) else "")

    def parse(self, raw: Any, pass_name: str) -> Any:
        """Convert a CLI string (or TOML value) to this option's type, checking bounds and choices."""
        base = _strip_optional(self.type)
        where = f"pass '{pass_name}': option '{self.name}'"
        if _is_optional(self.type) and isinstance(raw, str) and raw.lower() in ("none", ""):
            return None
        try:
            if self.is_list:
                item_type = typing.get_args(base)[0]
                items = raw if isinstance(raw, (list, tuple)) else [raw]
                return tuple(self._scalar(item_type, x, where) for x in items)
            return self._scalar(base, raw, where)
        except UsageError as e:
            raise UsageError(f"{e}; expected {self.type_name()}") from None

    def _scalar(self, typ: Any, raw: Any, where: str) -> Any:
        if _is_union(typ):      # the first member that takes the value
            error: UsageError | None = None
            for member in typing.get_args(typ):
                try:
                    return self._scalar(member, raw, where)
                except UsageError as e:
                    error = error or e
            assert error is not None
            raise error
        if typing.get_origin(typ) is Literal:
            choices = typing.get_args(typ)
            for c in choices:
                if str(c) == str(raw).lower() or c == raw:
                    return c
            raise UsageError(f"{where}: '{raw}' is not a valid choice")
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise UsageError(f"{where}: '{raw}' is not a boolean (true or false)")
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise UsageError(f"{where}: '{raw}' is not an integer")
            try:
                value = int(raw) if not isinstance(raw, str) else int(raw.strip(), 10)
            except ValueError:
                raise UsageError(f"{where}: '{raw}' is not an integer") from None
            self._check_bounds(value, where)
            return value
        if typ is float:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: '{raw}' is not a number") from None
            if isinstance(raw, bool) or not math.isfinite(value):
                raise UsageError(f"{where}: '{raw}' is not a finite number")
            self._check_bounds(value, where)
            return value
        if typ is str:
            text = str(raw)
            if not text:
                raise UsageError(f"{where}: empty value")
            return text
        raise TypeError(f"unsupported option type {typ!r}")

    def _check_bounds(self, value: float, where: str) -> None:
        bad_lo = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        bad_hi = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if bad_lo or bad_hi:
            raise UsageError(f"{where}: {value} is out of range")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_union(typ: Any) -> bool:
    return typing.get_origin(typ) in (typing.Union, types.UnionType)


def _is_optional(typ: Any) -> bool:
    return _is_union(typ) and type(None) in typing.get_args(typ)


def _strip_optional(typ: Any) -> Any:
    if _is_optional(typ):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0]
    return typ


# ------------------------------------------------------------------------------------------------------ passes


@dataclass
class PassResult:
    """What a pass did, for the report: counts, per-layer rows, and the sites it declined with reasons."""

    changed: bool = False
    counts: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Data for the caller rather than the report (e.g. quantize's calibration ranges for --save-calibration).
    artifacts: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, n: float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def decline(self, site: str, reason: str) -> None:
        log.info("  declined %s: %s", site, reason)
        self.declined.append({"site": site, "reason": reason})


@dataclass
class PassContext:
    """What a pass may use besides the graph: the original model (the teacher), data, shapes, seed."""

    original: onnx.ModelProto
    calib: Any = None                 # calibration.readers.DataSource or None
    # Tensor ranges from --load-calibration: {tensor name: (lo, hi)}; used instead of running calibration.
    calibration_ranges: dict[str, tuple[float, float]] | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0

    def require_calib(self, pass_name: str) -> Any:
        if self.calib is None:
            raise UsageError(f"pass '{pass_name}' needs calibration data: give --calib-data")
        return self.calib

    def to_model(self, graph: gs.Graph) -> onnx.ModelProto:
        return export(graph, self.original)


class Pass:
    """Base class of every rewrite pass. Subclasses set the ClassVars and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    exact: ClassVar[bool] = True
    # Passes this one must not run after, each with the reason shown to the user.
    must_not_follow: ClassVar[Mapping[str, str]] = {}

    def __init__(self, options: Any) -> None:
        self.options = options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        """Whether these options need calibration data (checked before the pipeline starts)."""
        return False

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls.Options)
        specs = []
        for f in dataclasses.fields(cls.Options):
            m = f.metadata
            specs.append(OptionSpec(name=f.name.replace("_", "-"), attr=f.name, type=hints[f.name],
                                    default=f.default, help=m.get("help", ""), lo=m.get("lo"), hi=m.get("hi"),
                                    lo_open=m.get("lo_open", False), hi_open=m.get("hi_open", False)))
        return specs


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"duplicate pass name {cls.name}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (importing the ``passes`` package registers them)."""
    import passes  # noqa: F401  (import for its registrations)

    return dict(_REGISTRY)


DEFAULT_PIPELINE = ("fold-constants", "fold-bn")


def default_pipeline() -> list[str]:
    """The exact, portable passes run when the user names none (those that are installed)."""
    return [name for name in DEFAULT_PIPELINE if name in registry()]


# ------------------------------------------------------------------------------------------------ pass specs


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: Any

    def build(self) -> Pass:
        return registry()[self.name](self.options)

    def __str__(self) -> str:
        defaults = registry()[self.name].Options()
        changed: list[str] = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value == getattr(defaults, f.name):
                continue
            key = f.name.replace("_", "-")
            items = value if isinstance(value, tuple) else (value,)
            changed += [f"{key}={str(v).lower() if isinstance(v, bool) else v}" for v in items]
        return self.name + (":" + ",".join(changed) if changed else "")


def _lookup(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise UsageError(f"unknown pass '{name}'; available: {', '.join(sorted(passes))}")
    return passes[name]


def make_spec(name: str, raw_options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> PassSpec:
    """Build a PassSpec from a pass name and raw option values (strings from the CLI or TOML values)."""
    cls = _lookup(name)
    specs = {s.name: s for s in cls.option_specs()}
    items = raw_options.items() if isinstance(raw_options, Mapping) else raw_options
    values: dict[str, Any] = {}
    for key, raw in items:
        key_cli = str(key).replace("_", "-")
        if key_cli not in specs:
            valid = ", ".join(sorted(specs)) or "none"
            raise UsageError(f"pass '{name}' has no option '{key}'; valid options: {valid}")
        spec = specs[key_cli]
        parsed = spec.parse(raw, name)
        if spec.is_list and spec.attr in values:
            values[spec.attr] = values[spec.attr] + parsed
        elif spec.attr in values:
            raise UsageError(f"pass '{name}': option '{key_cli}' given twice")
        else:
            values[spec.attr] = parsed
    try:
        options = cls.Options(**values)
    except (TypeError, ValueError) as e:  # cross-field checks in __post_init__
        raise UsageError(f"pass '{name}': {one_line(e)}") from None
    return PassSpec(name, options)


def parse_pass_arg(text: str) -> PassSpec:
    """Parse ``NAME[:key=value[,key=value...]]``; list options take the key repeated."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"--pass '{text}': missing pass name")
    pairs: list[tuple[str, str]] = []
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                _lookup(name)
                raise UsageError(f"--pass '{text}': expected key=value, got '{item}'")
            pairs.append((key.strip(), value.strip()))
    return make_spec(name, pairs)


def parse_recipe(path: str | Path) -> list[PassSpec]:
    """Read a TOML recipe: ``[[pass]]`` tables with ``name`` and the pass's options."""
    data = io.read_toml(path)
    unknown = set(data) - {"pass"}
    if unknown:
        raise InputError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}; a recipe holds [[pass]] tables")
    tables = data.get("pass", [])
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{path}: a recipe needs at least one [[pass]] table with a name")
    specs = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict) or "name" not in table:
            raise InputError(f"{path}: [[pass]] number {i} has no name")
        opts = {k: v for k, v in table.items() if k != "name"}
        specs.append(make_spec(str(table["name"]), opts))
    return specs


def check_calibration(specs: Sequence[PassSpec], have_calib: bool) -> None:
    """Refuse, before any work, a pipeline with a pass that needs calibration data when none is given."""
    for spec in specs:
        if not have_calib and spec.build().needs_calibration():
            raise UsageError(f"pass '{spec}' needs calibration data: give --calib-data")


def check_order(specs: Sequence[PassSpec]) -> None:
    """Refuse pipelines whose order makes no sense, naming both passes and the reason."""
    passes = registry()
    for i, later in enumerate(specs):
        rules = passes[later.name].must_not_follow
        for earlier in specs[:i]:
            if earlier.name in rules:
                raise UsageError(f"pass '{later.name}' cannot run after '{earlier.name}': {rules[earlier.name]}")


# ------------------------------------------------------------------------------------------------------ graph


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    """Make ``graph`` (the object the pipeline holds) take the contents of ``new``."""
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    graph.functions = new.functions


def _input_defaults(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are also graph inputs (IR < 4 style): defaults the caller may override, not constants."""
    inputs = {i.name for i in model.graph.input}
    return {t.name: t for t in model.graph.initializer if t.name in inputs}


def infer_shapes(graph: gs.Graph, ctx: "PassContext") -> bool:
    """Give the graph's tensors the dtypes and shapes onnx shape inference finds; False (graph untouched) when
    inference fails."""
    try:
        model = onnx.shape_inference.infer_shapes(export(graph, ctx.original))
    except Exception:
        return False
    replace_graph(graph, import_graph(model))
    return True


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph of the model; inputs with default initializers stay inputs (gs would freeze them)."""
    try:
        graph = gs.import_onnx(model)
    except Exception as e:
        raise InputError(f"cannot read the model's graph: {one_line(e)}") from e
    defaults = _input_defaults(model)
    if defaults:
        tensors = graph.tensors()
        order = [i.name for i in model.graph.input]
        for name in defaults:
            t = tensors.get(name)
            if isinstance(t, gs.Constant):
                t.to_variable(dtype=t.dtype, shape=list(t.shape))
                t.type = "tensor_type"
        graph.inputs = [tensors[n] for n in order if n in tensors]
    _patch_gs_import(graph, model.graph)
    return graph


def _patch_gs_import(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Undo what onnx-graphsurgeon loses on import, in a graph and its subgraphs.

    * attributes it skips (TYPE_PROTO such as Optional's ``type``, SPARSE_TENSOR, TENSORS, ...) go back on the node
      as their onnx values, which its exporter writes back as they were;
    * optional, map and opaque types and sequences of non-tensors, which its exporter crashes on or writes wrongly,
      are forgotten on the tensors; ``export`` restores the declared types from the original model.
    """
    for node, pnode in zip(graph.nodes, proto.node):
        for a in pnode.attribute:
            if a.name not in node.attrs:
                node.attrs[a.name] = onnx.helper.get_attribute_value(a)
            elif a.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs[a.name], gs.Graph):
                _patch_gs_import(node.attrs[a.name], a.g)
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.dtype is not None and (
                getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type")
                or isinstance(t.dtype, onnx.TypeProto) or (isinstance(t.dtype, int) and t.dtype == 0)):
            t.dtype, t.shape = None, None


def _graph_protos(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """A graph and all its subgraphs (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graph_protos(a.g)
            for sub in a.graphs:
                yield from _graph_protos(sub)


def _restore_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Put back the non-tensor types (optional, map, nested sequence) that ``_patch_gs_import`` had to forget."""
    types: dict[str, onnx.TypeProto] = {}
    for g in _graph_protos(template.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.HasField("type") and not vi.type.HasField("tensor_type"):
                types.setdefault(vi.name, vi.type)
    for g in _graph_protos(model.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.name in types and not vi.type.HasField("tensor_type"):
                vi.type.CopyFrom(types[vi.name])
        keep = [vi for vi in g.value_info if vi.HasField("type")]
        if len(keep) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep)


def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph to a ModelProto keeping the template model's IR version and model-level metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
    _restore_types(model, template)
    model.ir_version = max(template.ir_version, _min_ir_for(model))
    defaults = _input_defaults(template)
    if defaults:
        have = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(defaults[i.name] for i in model.graph.input
                                       if i.name in defaults and i.name not in have)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(template, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def _min_ir_for(model: onnx.ModelProto) -> int:
    """Lowest IR version that can carry the model's ai.onnx opset (a pass may have upgraded the opset)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return int(ir)
    return onnx.IR_VERSION


@dataclass
class StepRecord:
    """One pipeline step as the report shows it."""

    spec: str
    result: PassResult
    seconds: float
    removed_nodes: int
    nodes_after: int


def run_pipeline(model: onnx.ModelProto, specs: Sequence[PassSpec], ctx: PassContext, *, verify: bool = True,
                 dump_dir: Path | None = None, on_dump: Callable[[onnx.ModelProto, Path], None] | None = None
                 ) -> tuple[onnx.ModelProto, list[StepRecord]]:
    """Run the passes in order, cleaning up and verifying after each; return the final model and the records."""
    check_order(specs)
    graph = import_graph(model)
    records: list[StepRecord] = []
    current = model
    for i, spec in enumerate(specs, 1):
        p = spec.build()
        log.info("pass %d/%d: %s", i, len(specs), spec)
        t0 = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except (GraphoptError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise InternalError(f"pass '{spec.name}' crashed: {type(e).__name__}: {one_line(e)}") from e
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        current = export(graph, ctx.original)
        if verify:
            try:
                io.check_model(current, f"after pass '{spec.name}'")
            except InputError as e:
                raise InternalError(f"pass '{spec.name}' produced an invalid model: {e}") from e
        seconds = time.perf_counter() - t0
        records.append(StepRecord(str(spec), result, seconds, removed, len(graph.nodes)))
        if dump_dir is not None:
            target = dump_dir / f"{i:02d}-{spec.name}.onnx"
            (on_dump or (lambda m, path: io.save_model(m, path)))(current, target)
    return current, records
