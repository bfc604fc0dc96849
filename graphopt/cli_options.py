"""The command line's shared options (the main command's and the sweep's): data, targets, measurement, and how
they become ``graphopt.optimize``'s keyword arguments; the number parsers behind them."""

from __future__ import annotations

import argparse
from typing import Any

from graphopt.calibration.readers import parse_shape

from .errors import UsageError
from .fixed_inputs import parse_fix_input
from .taskmetric import load_metric


def fraction(text: str) -> float:
    """A target in [0, 1] (cosine, top-1 agreement)."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-data", metavar="PATH", help=".npz (arrays stacked on axis 0), folder of .npz files, or "
                   "folder of images (with --preprocess)")
    p.add_argument("--val-data", metavar="PATH", help="validation data (default: calibration data, else random)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1xD2x...",
                   help="concrete shape for an input with dynamic dims (for random validation inputs)")
    p.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE[,VALUE...]",
                   help="make this input a constant of this value (an input fixed in deployment, e.g. sr=16000), "
                   "so fold-constants can inline the If it decides")
    preprocess_arg(p)


def target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-cosine", type=fraction, metavar="X",
                   help="lossy pipelines: fail below this output cosine (default 0.98; 0: off)")
    p.add_argument("--min-top1", type=fraction, metavar="X",
                   help="lossy pipelines: fail below this top-1 agreement on class scores (default 0.95; 0: off)")
    p.add_argument("--max-accuracy-drop", type=non_negative, metavar="POINTS",
                   help="lossy pipelines: fail when accuracy on the data's __labels__ drops more (default 1.0)")
    p.add_argument("--slices", action="append", default=[], metavar="OUTPUT:AXIS[:a-b,...]",
                   help="cosine per slice of OUTPUT along AXIS (per entry, or per group of entries; OUTPUT:none: "
                   "not sliced), the worst held to min-cosine (default: rank >= 3 outputs with a last axis of "
                   "2..128, per entry; see docs/fidelity.md)")
    p.add_argument("--scores", action="append", default=[], metavar="OUTPUT[:AXIS]",
                   help="OUTPUT holds class scores along AXIS (default: last): top-1 per position, held to min-top1")
    p.add_argument("--metric", metavar="FILE.py:FUNCTION",
                   help="task metric f(reference_outputs, candidate_outputs, labels) -> float, higher is better; "
                   "used by validation and by every search")
    p.add_argument("--min-metric", type=number, metavar="X", help="fail when the --metric value is below X")
    p.add_argument("--max-metric-drop", type=non_negative, metavar="X",
                   help="fail when the --metric value is more than X below the float model's own")
    p.add_argument("--no-gate", action="store_true",
                   help="lossy pipelines: no targets (write whatever the passes make, still checked for NaN/shape)")
    p.add_argument("--max-rel-error", type=non_negative, metavar="X",
                   help="lossy passes: fail above this max|y-x|/max|x| per output")


def measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs and sampling (default 0)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for latency (default 1)")
    p.add_argument("--latency-runs", type=int, default=20, metavar="N",
                   help="timed runs per model for latency (more for a model that runs them in under 0.2 s), "
                        "0 to skip (default 20)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples/feeds")


def preprocess_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preprocess", metavar="KEY=VALUE,...",
                   help="for a folder of images: resize=N|WxH, crop=N|WxH, scale=1/255, mean=a/b/c, std=a/b/c, "
                   "layout=nchw|nhwc, color=rgb|bgr|gray, dtype=..., labels=folders")


def settings(args: argparse.Namespace, preprocess: Any) -> dict[str, Any]:
    """``optimize``'s data, target and measurement arguments from the command line (the main command's and the
    sweep's)."""
    return dict(calib_data=args.calib_data, val_data=args.val_data, input_shapes=shapes(args.input_shape),
                min_cosine=args.min_cosine, min_top1=args.min_top1, max_rel_error=args.max_rel_error,
                max_accuracy_drop=args.max_accuracy_drop, gate=not args.no_gate, seed=args.seed,
                latency_runs=args.latency_runs, threads=args.threads, calib_samples=args.calib_samples,
                preprocess=preprocess, slices=args.slices, scores=args.scores,
                metric=load_metric(args.metric) if args.metric else None, min_metric=args.min_metric,
                max_metric_drop=args.max_metric_drop, fix_inputs=fixed(args.fix_input))


def shapes(items: list[str]) -> dict[str, list[int]]:
    return dict(parse_shape(s) for s in items)


def fixed(items: list[str]) -> dict[str, list[str]]:
    fixed: dict[str, list[str]] = {}
    for name, values in map(parse_fix_input, items):
        if name in fixed:
            raise UsageError(f"--fix-input names input '{name}' twice")
        fixed[name] = values
    return fixed
