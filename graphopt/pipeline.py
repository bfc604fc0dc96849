"""The pipeline: parse pass specs (CLI strings, TOML recipes, API pairs), check the order, and run the passes.

Before anything runs it refuses orders that make no sense (``must_not_follow``) and adds each pass's declared
``prerequisites`` right before it (default options) unless the pipeline runs them earlier. For each pass it checks
the precondition (``requires``: the pass is declined as a whole with that reason), runs it, removes dead nodes and
unused initializers, sorts topologically, exports and runs ``onnx.checker`` (``verify=False`` skips it), and
optionally dumps the model. When a pass asks for it (``graph.SPARSE_STORAGE`` in its artifacts), the final
model keeps its mostly-zero initializers as sparse ones. Importing this module registers the built-in passes
(``graphopt.passes.catalog``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import onnx

from graphopt.calibration.preprocess import Preprocess, preprocess_from_table
from graphopt.passes import catalog  # noqa: F401  (registers the built-in passes)
from graphopt.passes.base import Pass, PassContext, PassResult, registered

from . import io
from .errors import GraphoptError, InputError, InternalError, UsageError, one_line
from .external_data import Spill
from .graph import SPARSE_STORAGE, cleanup, export, hold_in_file, import_graph, to_sparse_initializers
from .validate import Thresholds

log = logging.getLogger("graphopt")


DEFAULT_PIPELINE = ("fold-constants", "fold-bn")


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name: the built-in ones and any registered since (tests, plug-ins)."""
    return registered()


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

    def effective_options(self) -> dict[str, Any]:
        """Every option's value, defaults included, by its CLI spelling (the report's record of the run)."""
        return {f.name.replace("_", "-"): getattr(self.options, f.name) for f in dataclasses.fields(self.options)}


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
    return make_spec(*split_pass_arg(text))


def split_pass_arg(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``NAME[:key=value[,key=value...]]`` as the pass name and its (key, raw value) pairs, unparsed (the sweep
    reads a range from one value before ``make_spec`` parses each)."""
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
    return name, pairs


def parse_recipe(path: str | Path) -> list[PassSpec]:
    """Read a TOML recipe: ``[[pass]]`` tables with ``name`` and the pass's options (and an optional
    ``[preprocess]`` table for images, which ``recipe_preprocess`` reads)."""
    data = io.read_toml(path)
    unknown = set(data) - {"pass", "preprocess"}
    if unknown:
        raise InputError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}; a recipe holds [[pass]] tables "
                         "and an optional [preprocess] table")
    recipe_preprocess(path, data)
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


def recipe_preprocess(path: str | Path, data: Mapping[str, Any] | None = None) -> Preprocess | None:
    """The recipe's ``[preprocess]`` table (the keys of ``--preprocess``) as a Preprocess, or None."""
    table = (io.read_toml(path) if data is None else data).get("preprocess")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise InputError(f"{path}: 'preprocess' must be a table: [preprocess] with keys such as resize = 256")
    return preprocess_from_table(table, f"{path} [preprocess]")


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


def with_prerequisites(specs: Sequence[PassSpec]) -> list[PassSpec]:
    """The pipeline with each pass's prerequisites (default options; theirs first, recursively) added right before
    it, unless they run earlier."""
    out: list[PassSpec] = []

    def add(spec: PassSpec, chain: tuple[str, ...]) -> None:
        for name in registry()[spec.name].prerequisites:
            if name in chain:
                raise InternalError(f"passes {' -> '.join(chain)} -> {name} require each other")
            if name not in {s.name for s in out}:
                add(PassSpec(name, registry()[name].Options()), chain + (name,))
        out.append(spec)

    for spec in specs:
        add(spec, (spec.name,))
    return out


def share(t: Thresholds, n: int) -> Thresholds:
    """The targets each of ``n`` lossy passes searches against, so that the pipeline ends within ``t``: each pass is
    judged against its own input, and losses add up roughly (1 − cosine, top-1 disagreements and accuracy or metric
    points of small independent errors add; at most, for disagreements), so each gets 1/n of the room below
    perfect. A floor on the task metric (--min-metric) is absolute, so it is kept as it is."""
    if n < 2:
        return t
    return dataclasses.replace(t, min_cosine=1 - (1 - t.min_cosine) / n if t.min_cosine else t.min_cosine,
                               min_top1=1 - (1 - t.min_top1) / n if t.min_top1 else t.min_top1,
                               max_accuracy_drop=(t.max_accuracy_drop / n if t.max_accuracy_drop is not None
                                                  else None),
                               max_metric_drop=t.max_metric_drop / n if t.max_metric_drop is not None else None)


def share_note(t: Thresholds, n: int) -> str:
    parts = [f"min-cosine {t.min_cosine:.4g}" if t.min_cosine else "",
             f"min-top1 {t.min_top1:.4g}" if t.min_top1 else "",
             f"max-accuracy-drop {t.max_accuracy_drop:.3g}" if t.max_accuracy_drop is not None else ""]
    return (f"targets shared by the pipeline's {n} lossy passes: this pass searched against 1/{n} of the room "
            f"below perfect ({', '.join(p for p in parts if p)}), so that the pipeline ends within its targets")


def _run_pass(p: Pass, graph: Any, ctx: PassContext) -> PassResult:
    """The pass's precondition, then the pass: a graph that does not qualify is left as it is, with the reason."""
    reason = p.requires(graph, ctx)
    if reason is None:
        return p.run(graph, ctx)
    result = PassResult()
    result.decline("model", reason)
    return result


# Passes that run on a model over the 2 GB protobuf limit (never serializing it whole, reading its weights one at a
# time from the input's files: graphopt.graph.FileConstant); others are refused there. A pass joins when it holds at
# most one weight's values (and what it computes from them) at a time.
BIG_MODEL_PASSES = ("fold-constants", "fold-bn", "fuse-conv-relu", "quantize-dynamic", "quantize-weights", "svd")
# Options of those passes that would hold more (why, as the refusal says it); the pass's options -> reason or None.
_MOMENTS = ("gathers every layer's K x K input second moment at once in one calibration run (beside the model's "
            "session), not one weight at a time")
BIG_MODEL_REFUSED: dict[str, Callable[[Any], str | None]] = {
    "quantize-weights": lambda o: f"method={o.method} {_MOMENTS}; use method=rtn" if o.method != "rtn" else None,
    "svd": lambda o: ("rank=auto judges each candidate's session beside the input's (two copies of the weights) "
                      f"and {_MOMENTS}; give a rank, ratio, energy or max-error" if o.rank == "auto" else
                      f"data-aware=true {_MOMENTS}" if o.data_aware else None),
}


def _check_big_model(model: onnx.ModelProto, specs: Sequence[PassSpec]) -> None:
    """Refuse, before any pass runs, a pass (or a pass's option) that cannot handle a model over the protobuf limit,
    in one line."""
    if not io.is_big(model):
        return
    unable = [s.name for s in specs if s.name not in BIG_MODEL_PASSES]
    if unable:
        raise InputError(f"pass '{unable[0]}' cannot handle a model over the 2 GB protobuf limit yet; passes that "
                         f"can: {', '.join(BIG_MODEL_PASSES)}")
    for s in specs:
        why = BIG_MODEL_REFUSED[s.name](s.options) if s.name in BIG_MODEL_REFUSED else None
        if why:
            raise UsageError(f"pass '{s}' cannot run on a model over the 2 GB protobuf limit: {why}")


@dataclass
class StepRecord:
    """One pipeline step as the report shows it."""

    spec: str
    options: dict[str, Any]     # every option's value, defaults included
    result: PassResult
    seconds: float
    removed_nodes: int
    nodes_after: int
    # A lossy step's input and output models, kept (``keep_lossy``) to tell which pass lost what.
    models: tuple[onnx.ModelProto, onnx.ModelProto] | None = None


def run_pipeline(model: onnx.ModelProto, specs: Sequence[PassSpec], ctx: PassContext, *, verify: bool = True,
                 dump_dir: Path | None = None, on_dump: Callable[[onnx.ModelProto, Path], None] | None = None,
                 keep_lossy: bool = False, on_step: Callable[[StepRecord], None] | None = None
                 ) -> tuple[onnx.ModelProto, list[StepRecord]]:
    """Run the passes (and their prerequisites) in order, cleaning up and verifying after each; return the final
    model and the records (with each lossy step's input and output models when ``keep_lossy``). ``on_step`` is
    called with each record as its step finishes."""
    specs = with_prerequisites(specs)
    check_order(specs)
    _check_big_model(model, specs)
    graph = import_graph(model)
    spill = Spill() if io.is_big(model) else None
    records: list[StepRecord] = []
    current = model
    lossy = sum(1 for s in specs if not s.build().exact)
    shared = dataclasses.replace(ctx, targets=share(ctx.targets, lossy))
    for i, spec in enumerate(specs, 1):
        p = spec.build()
        log.info("pass %d/%d: %s", i, len(specs), spec)
        t0 = time.perf_counter()
        try:
            result = _run_pass(p, graph, ctx if p.exact or lossy < 2 else shared)
        except (GraphoptError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise InternalError(f"pass '{spec.name}' crashed: {type(e).__name__}: {one_line(e)}") from e
        before, previous = len(graph.nodes), current
        cleanup(graph).toposort()
        if spill is not None:       # a big model: the weights the pass made go to a file too (graph.hold_in_file)
            hold_in_file(graph, spill)
        removed = before - len(graph.nodes)
        current = export(graph, ctx.original)
        if verify:
            try:
                io.check_model(current, f"after pass '{spec.name}'")
            except InputError as e:
                raise InternalError(f"pass '{spec.name}' produced an invalid model: {e}") from e
        seconds = time.perf_counter() - t0
        if p.searches() and lossy > 1 and shared.targets != ctx.targets:
            result.notes.insert(0, share_note(shared.targets, lossy))
        kept = (previous, current) if keep_lossy and not p.exact else None
        records.append(StepRecord(str(spec), spec.effective_options(), result, seconds, removed, len(graph.nodes),
                                  kept))
        if on_step is not None:
            on_step(records[-1])
        if dump_dir is not None:
            target = dump_dir / f"{i:02d}-{spec.name}.onnx"
            (on_dump or (lambda m, path: io.save_model(m, path)))(current, target)
    if any(r.result.artifacts.get(SPARSE_STORAGE) for r in records) and not io.is_big(current):
        to_sparse_initializers(current)      # a pass asked for it (prune-weights:storage=sparse)
    return current, records
