"""Command line: ``python -m graphopt IN.onnx OUT.onnx [--pass NAME[:k=v,...]]... [options]`` (DESIGN.md §2).

Also ``graphopt info MODEL`` (a model's summary), ``graphopt sweep IN.onnx --pass NAME:option=RANGE ...`` (the
trade-off curve over one option, graphopt.sweep) and ``graphopt --list-passes``. Every failure is one line on
stderr with exit code 2 (bad input or usage), 1 (validation failed; nothing written unless --force) or 3 (a bug in
graphopt); ``--debug`` adds the traceback. OUT is checked before any work and written atomically at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from graphopt.calibration.preprocess import parse_preprocess
from graphopt.calibration.readers import RandomSource, check_preprocess_used, model_inputs, open_source

from . import __version__, cli_options as opts, io, plot
from .api import one_row, optimize, resolve_passes
from .errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION,
                     GraphoptError, InputError, InternalError, UsageError, ValidationFailed, one_line)
from .pipeline import default_pipeline, parse_recipe, recipe_preprocess, registry
from .report import environment, format_header, format_step, summary
from .sweep import parse_sweep, run_sweep
from .sweep_output import check_outputs, format_knees, format_row, write_tables

log = logging.getLogger("graphopt")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="Rewrite an ONNX model to make it smaller and faster, validated in "
                "onnxruntime. Also: 'graphopt info MODEL' prints a model's summary; 'graphopt sweep IN.onnx --pass "
                "NAME:option=START:STOP:STEP ...' measures the trade-off curve over one option.")
    p.add_argument("paths", nargs="*", metavar="IN.onnx OUT.onnx", help="input model and output path")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="run this pass (repeatable, in order); list options repeat the key. Default pipeline "
                   "when none is given: the exact passes fold-constants, fold-bn")
    p.add_argument("--recipe", metavar="FILE.toml", help="passes from a TOML file: [[pass]] name = ... options")
    opts.data_args(p)
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    opts.target_args(p)
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker after each pass")
    p.add_argument("--force", action="store_true", help="write OUT even when validation fails (exit code stays 1)")
    p.add_argument("--dump-dir", metavar="DIR", help="save the model after each pass into DIR")
    opts.measure_args(p)
    p.add_argument("--save-calibration", metavar="FILE.json", help="write quantize's calibration ranges as JSON")
    p.add_argument("--load-calibration", metavar="FILE.json",
                   help="reuse ranges saved by --save-calibration instead of calibrating (no --calib-data needed)")
    p.add_argument("--list-passes", action="store_true", help="list passes with their options and exit")
    p.add_argument("--version", action="store_true", help="print graphopt's version and exit")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each pass and every declined site")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt info", description="Print a model's summary: IR and opsets, size, parameters, MACs "
                "of one run (on the first sample of DATA, else on seeded random inputs), nodes, inputs and outputs.")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--data", "--val-data", "--calib-data", dest="data", metavar="PATH",
                   help="count MACs on this data's first sample (.npz or folder of .npz)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1xD2x...",
                   help="concrete shape for an input with dynamic dims (for the random sample)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random sample (default 0)")
    opts.preprocess_arg(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt sweep", description="Run a pipeline once per value of one pass option and measure "
                "each result as the main command does: accuracy (or cosine/top-1), latency against the input, size, "
                "MACs, pass/fail against the targets. Writes no model unless --keep-dir is given.")
    p.add_argument("model", metavar="IN.onnx")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="the pipeline (repeatable, in order); exactly one option carries the values: "
                   "start:stop:step (stop included) or a|b|c, e.g. prune-channels:ratio=0.1:0.6:0.1")
    opts.data_args(p)
    opts.target_args(p)
    opts.measure_args(p)
    p.add_argument("--csv", metavar="FILE.csv", help="write the rows as CSV")
    p.add_argument("--json", metavar="FILE.json", help="write the rows, targets and setup as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the curves (needs pip install 'graphopt[plot]')")
    p.add_argument("--keep-dir", metavar="DIR", help="save each value's model into DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p

def list_passes() -> str:
    defaults = default_pipeline()
    lines = []
    for name, cls in sorted(registry().items()):
        tags = ["exact" if cls.exact else "lossy"] + (["default"] if name in defaults else [])
        lines.append(f"{name}  [{', '.join(tags)}]")
        lines.append(f"    {cls.summary}")
        for spec in cls.option_specs():
            lines.append(f"    {spec.name}: {spec.type_name()} = {spec.default!r}  {spec.help}")
    return "\n".join(lines)


def _run(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["info"]:
        return _info(build_info_parser().parse_args(argv[1:]))
    if argv[:1] == ["sweep"]:
        return _sweep(build_sweep_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    if args.version:
        print(f"graphopt {__version__}")
        return EXIT_OK
    if args.list_passes:
        print(list_passes())
        return EXIT_OK
    if len(args.paths) != 2:
        raise UsageError("expected IN.onnx OUT.onnx (or 'info MODEL', or --list-passes)")
    _check_counts(args)
    return _optimize(args)


def _check_counts(args: argparse.Namespace) -> None:
    for name, value in (("--threads", args.threads), ("--calib-samples", args.calib_samples)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be positive")
    if args.latency_runs < 0:
        raise UsageError("--latency-runs must be 0 (skip latency) or more")


def _info(args: argparse.Namespace) -> int:
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    check_preprocess_used(preprocess, args.data)
    model = io.load_model(args.model)
    source = open_source(args.data, model, preprocess=preprocess) if args.data else RandomSource(model_inputs(model),
                                                                          opts.shapes(args.input_shape), args.seed,
                                                                          n_feeds=1)
    first = next(iter(source), None)
    feed = one_row(first, model) if first is not None else None
    print(summary(model, feed, args.model, source.description))
    return EXIT_OK


def _optimize(args: argparse.Namespace) -> int:
    in_path, out_path = Path(args.paths[0]), Path(args.paths[1])
    if args.recipe and args.passes:
        raise UsageError("give passes with --pass or with --recipe, not both")
    passes = resolve_passes(parse_recipe(args.recipe) if args.recipe else (args.passes or None))
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    if args.recipe and (from_recipe := recipe_preprocess(args.recipe)) is not None:
        if preprocess is not None:
            raise UsageError("give the preprocessing with --preprocess or in the recipe's [preprocess], not both")
        preprocess = from_recipe
    if args.save_calibration and not any(registry()[s.name].calibrates for s in passes):
        raise UsageError(f"--save-calibration: no pass in this pipeline calibrates ranges (passes that do: "
                         f"{', '.join(n for n, c in sorted(registry().items()) if c.calibrates)})")
    model, protected = io.load_model_and_files(in_path)
    io.check_output_path(out_path, protected)
    for extra in (args.report, args.save_calibration):
        if extra:
            io.check_output_path(extra, protected + [out_path])
    ranges = _load_calibration(args.load_calibration) if args.load_calibration else None
    status = EXIT_OK
    try:
        out, report = optimize(model, passes, on_step=None if args.quiet else _stream_steps(),
                               validate_output=not args.no_validate, force=args.force, verify=not args.no_verify,
                               dump_dir=args.dump_dir, calibration_ranges=ranges, **opts.settings(args, preprocess))
    except ValidationFailed as e:
        report = e.report
        report.input = str(in_path)
        if not args.quiet:
            _say(report.format(header=False, steps=False))
        if args.report:
            io.write_json(args.report, report.to_dict())
        raise
    report.input, report.output = str(in_path), str(out_path)
    if report.validation is not None and not report.validation.passed:
        status = EXIT_VALIDATION  # --force: written anyway, still reported as failed
    written = io.save_model(out, out_path)
    if args.save_calibration:
        saved = [p["artifacts"]["calibration"] for p in report.passes if "calibration" in p["artifacts"]]
        if saved:
            io.write_json(args.save_calibration, {"graphopt_calibration": 1, **saved[-1]})
        else:   # the calibrating pass declined the model (already quantized, nothing to quantize)
            log.warning("--save-calibration: nothing was calibrated (see the report), %s not written",
                        args.save_calibration)
    if args.report:
        io.write_json(args.report, report.to_dict())
    if not args.quiet:
        _say(report.format(header=False, steps=False), f"wrote {', '.join(str(p) for p in written)}")
    if status == EXIT_VALIDATION:
        print(f"error: validation failed: {report.validation.failures[0]} (written anyway: --force)",  # type: ignore[union-attr]
              file=sys.stderr)
    return status


def _sweep(args: argparse.Namespace) -> int:
    """``graphopt sweep``: every check before any work, then one table line per value as it is measured, the knees,
    and the tables and picture written atomically (never over the input)."""
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    sweep = parse_sweep(args.passes, have_calib=args.calib_data is not None)
    if args.plot and not plot.HAVE_MATPLOTLIB:
        raise UsageError(plot.NEEDS_MATPLOTLIB)
    _check_counts(args)
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    model, protected = io.load_model_and_files(args.model)
    keep = check_outputs(sweep, [p for p in (args.csv, args.json, args.plot) if p], args.keep_dir, protected)
    header = [format_header(environment()), f"sweep of {sweep.label} over {len(sweep.values)} values: {sweep.shape}"]

    def show(row: Any) -> None:   # the header with the first row: data refused before it leaves one line
        _say(*header, format_row(row, sweep.option))
        header.clear()

    result = run_sweep(model, Path(args.model).name, sweep, opts.settings(args, preprocess), keep=keep,
                       on_row=None if args.quiet else show)
    written = write_tables(result, args.csv, args.json)
    if args.plot:
        io.write_bytes(args.plot, plot.render(result))
        written.append(args.plot)
    if not args.quiet:
        _say(*[f"warning: {w}" for w in result.warnings], *format_knees(result),
             *([f"wrote {', '.join(written)}"] if written else []))
    return EXIT_OK

def _stream_steps() -> Callable[[dict[str, Any]], None]:
    """Print each pipeline step as it finishes, after the report's header before the first: a long pipeline shows
    its progress, the rest of the report follows at the end, and a refusal before any pass prints no half report."""
    printed: list[dict[str, Any]] = []

    def show(row: dict[str, Any]) -> None:
        lines = [format_header(environment()), "pipeline:"] if not printed else []
        printed.append(row)
        _say(*lines, *format_step(row))

    return show


def _say(*lines: str) -> None:
    """Print the report's lines on stdout. The report is a by-product: when its reader has gone away
    (``graphopt ... | head``), stdout goes to /dev/null and the run goes on to write its model."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _load_calibration(path: str) -> dict[str, list[float]]:
    data = io.read_json(path)
    ranges = data.get("ranges") if isinstance(data, dict) and data.get("graphopt_calibration") == 1 else None
    if not isinstance(ranges, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
            for v in ranges.values()):
        raise InputError(f"{path}: not a graphopt calibration file (written by --save-calibration)")
    return ranges


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except ValidationFailed as e:
        print(f"error: {e} (nothing written; --force writes anyway)", file=sys.stderr)
        return EXIT_VALIDATION
    except GraphoptError as e:
        if debug:
            traceback.print_exc()
        kind = "internal error" if isinstance(e, InternalError) else "error"
        hint = " (this is a bug in graphopt; --debug shows the traceback)" if isinstance(e, InternalError) else ""
        print(f"{kind}: {one_line(e)}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:   # stdout's reader went away (| head): stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {one_line(e)} (this is a bug in graphopt; --debug shows the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL
