"""Command line: ``python -m graphopt IN.onnx OUT.onnx [--pass NAME[:k=v,...]]... [options]`` (DESIGN.md §2).

Also ``graphopt info MODEL`` (a model's summary) and ``graphopt --list-passes``. Every failure is one line on
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
from graphopt.calibration.readers import RandomSource, check_preprocess_used, model_inputs, open_source, parse_shape

from . import __version__, io
from .api import one_row, optimize, resolve_passes
from .errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION,
                     GraphoptError, InputError, InternalError, UsageError, ValidationFailed, one_line)
from .fixed_inputs import parse_fix_input
from .pipeline import default_pipeline, parse_recipe, recipe_preprocess, registry
from .report import environment, format_header, format_step, summary

log = logging.getLogger("graphopt")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _fraction(text: str) -> float:
    """A target in [0, 1] (cosine, top-1 agreement)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="Rewrite an ONNX model to make it smaller and faster, validated in "
                "onnxruntime. Also: 'graphopt info MODEL' prints a model's summary.")
    p.add_argument("paths", nargs="*", metavar="IN.onnx OUT.onnx", help="input model and output path")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="run this pass (repeatable, in order); list options repeat the key. Default pipeline "
                   "when none is given: the exact passes fold-constants, fold-bn")
    p.add_argument("--recipe", metavar="FILE.toml", help="passes from a TOML file: [[pass]] name = ... options")
    p.add_argument("--calib-data", metavar="PATH", help=".npz (arrays stacked on axis 0), folder of .npz files, or "
                   "folder of images (with --preprocess)")
    p.add_argument("--val-data", metavar="PATH", help="validation data (default: calibration data, else random)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1xD2x...",
                   help="concrete shape for an input with dynamic dims (for random validation inputs)")
    p.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE[,VALUE...]",
                   help="make this input a constant of this value (an input fixed in deployment, e.g. sr=16000), "
                   "so fold-constants can inline the If it decides")
    _preprocess_arg(p)
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    p.add_argument("--min-cosine", type=_fraction, metavar="X",
                   help="lossy pipelines: fail below this output cosine (default 0.98; 0: off)")
    p.add_argument("--min-top1", type=_fraction, metavar="X",
                   help="lossy pipelines: fail below this top-1 agreement on class scores (default 0.95; 0: off)")
    p.add_argument("--max-accuracy-drop", type=_non_negative, metavar="POINTS",
                   help="lossy pipelines: fail when accuracy on the data's __labels__ drops more (default 1.0)")
    p.add_argument("--no-gate", action="store_true",
                   help="lossy pipelines: no targets (write whatever the passes make, still checked for NaN/shape)")
    p.add_argument("--max-rel-error", type=_non_negative, metavar="X",
                   help="lossy passes: fail above this max|y-x|/max|x| per output")
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker after each pass")
    p.add_argument("--force", action="store_true", help="write OUT even when validation fails (exit code stays 1)")
    p.add_argument("--dump-dir", metavar="DIR", help="save the model after each pass into DIR")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs and sampling (default 0)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for latency (default 1)")
    p.add_argument("--latency-runs", type=int, default=20, metavar="N",
                   help="timed runs per model for latency (more for a model that runs them in under 0.2 s), "
                        "0 to skip (default 20)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples/feeds")
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
    _preprocess_arg(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _preprocess_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preprocess", metavar="KEY=VALUE,...",
                   help="for a folder of images: resize=N|WxH, crop=N|WxH, scale=1/255, mean=a/b/c, std=a/b/c, "
                   "layout=nchw|nhwc, color=rgb|bgr|gray, dtype=..., labels=folders")


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
    for name, value in (("--threads", args.threads), ("--calib-samples", args.calib_samples)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be positive")
    if args.latency_runs < 0:
        raise UsageError("--latency-runs must be 0 (skip latency) or more")
    return _optimize(args)


def _shapes(items: list[str]) -> dict[str, list[int]]:
    return dict(parse_shape(s) for s in items)


def _fixed(items: list[str]) -> dict[str, list[str]]:
    fixed: dict[str, list[str]] = {}
    for name, values in map(parse_fix_input, items):
        if name in fixed:
            raise UsageError(f"--fix-input names input '{name}' twice")
        fixed[name] = values
    return fixed


def _info(args: argparse.Namespace) -> int:
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    check_preprocess_used(preprocess, args.data)
    model = io.load_model(args.model)
    source = open_source(args.data, model, preprocess=preprocess) if args.data else RandomSource(model_inputs(model),
                                                                          _shapes(args.input_shape), args.seed,
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
                               calib_data=args.calib_data, val_data=args.val_data,
                               input_shapes=_shapes(args.input_shape), validate_output=not args.no_validate,
                               min_cosine=args.min_cosine, min_top1=args.min_top1,
                               max_rel_error=args.max_rel_error, max_accuracy_drop=args.max_accuracy_drop,
                               gate=not args.no_gate, force=args.force, seed=args.seed,
                               verify=not args.no_verify, dump_dir=args.dump_dir, latency_runs=args.latency_runs,
                               threads=args.threads, calib_samples=args.calib_samples, calibration_ranges=ranges,
                               preprocess=preprocess, fix_inputs=_fixed(args.fix_input))
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
