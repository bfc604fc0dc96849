"""What a sweep writes (graphopt.sweep measures): one stdout line per value, the closing knee lines, the rows as
CSV and the whole result as JSON (written atomically through graphopt.io), and with --keep-dir one model per value.
Outputs are checked before any work: never over the input, nor two outputs on one file.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import onnx

from . import io
from .errors import OutputError, UsageError
from .sweep import Row, Sweep, SweepResult, knee


CSV_FIELDS = ["value", "passed", "accuracy", "cosine", "top1", "latency_ms", "latency_ratio", "size_bytes",
              "parameters", "macs", "seconds", "reason"]


class _Lines(list):
    def write(self, text: str) -> None:
        self.append(text)


def to_csv(result: SweepResult) -> str:
    lines = _Lines()
    w = csv.writer(lines, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in result.rows:
        w.writerow(["" if (x := getattr(r, f)) is None else (round(x, 6) if isinstance(x, float) else x)
                    for f in CSV_FIELDS])
    return "".join(lines)


def format_row(r: Row, option: str) -> str:
    """One line of the stdout table."""
    name = "input" if r.value == "input" else f"{option}={r.value}"
    if not r.measured:
        return f"{name:<22} error   {r.reason}"
    verdict = "reference" if r.value == "input" else ("pass" if r.passed else "FAIL")
    figures = [f"acc {r.accuracy:6.2f}%" if r.accuracy is not None else "",
               f"cos {r.cosine:.5f}" if r.cosine is not None else "",
               f"top-1 {r.top1:6.2f}%" if r.top1 is not None else "",
               f"latency {r.latency_ratio:.2f}x" if r.latency_ratio is not None else "latency -",
               f"size {r.size_bytes / 1024:,.1f} KB", f"params {r.parameters:,}",
               f"MACs {r.macs / 1e6:,.2f} M" if r.macs is not None else "MACs -"]
    line = f"{name:<22} {verdict:<9} " + "  ".join(f for f in figures if f)
    return line + (f"  ({r.reason.split('; ')[0]})" if verdict == "FAIL" else "")


def format_knees(result: SweepResult) -> list[str]:
    """The closing lines: the best passing value by latency and by size (the knee of each curve)."""
    lines = []
    for cost, what in (("latency_ratio", "latency"), ("size_bytes", "size")):
        best = knee(result.rows, cost)
        if best is None:
            measured = any(getattr(r, cost) is not None for r in result.rows[1:])
            lines.append(f"knee by {what}: " + ("no value met the targets" if measured else "not measured"))
            continue
        ref = getattr(result.rows[0], cost)
        if cost == "size_bytes":
            gain = f"{best.size_bytes / ref:.0%} of the input's size"
        elif best.latency_ratio <= 1:
            gain = f"{1 / best.latency_ratio:.2f}x faster"
        else:   # every passing value measured slower than the input (int8 on a tiny model): say so
            gain = f"{best.latency_ratio:.2f}x slower than the input"
        lines.append(f"knee by {what}: {result.sweep.option}={best.value} ({gain}, " + (
            f"accuracy {best.accuracy:.2f}%)" if best.accuracy is not None else f"cosine {best.cosine:.5f})"))
    return lines


def check_outputs(sweep: Sweep, paths: Sequence[str], keep_dir: str | None, protected: list[Path]
                  ) -> Callable[[int, str, onnx.ModelProto], None] | None:
    """Refuse, before any work, outputs that cannot be written, that would overwrite the input or one another;
    create ``keep_dir`` and return the writer of each value's model into it (None without it)."""
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise UsageError("--csv, --json and --plot name the same file; give each its own")
    for p in paths:
        io.check_output_path(p, protected)
    if not keep_dir:
        return None
    folder = Path(keep_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--keep-dir {folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    where = {i: folder / f"{i:02d}-{sweep.pass_name}-{sweep.option}={v}.onnx" for i, v in enumerate(sweep.values, 1)}
    for path in where.values():
        io.check_output_path(path, protected)

    def keep(i: int, value: str, model: onnx.ModelProto) -> None:
        io.save_model(model, where[i])

    return keep


def write_tables(result: SweepResult, csv_path: str | None, json_path: str | None) -> list[str]:
    """Write the rows as CSV and the whole result as JSON (where asked), atomically; the paths written."""
    written = []
    if csv_path:
        io.write_text(csv_path, to_csv(result))
        written.append(csv_path)
    if json_path:
        io.write_json(json_path, result.to_dict())
        written.append(json_path)
    return written

