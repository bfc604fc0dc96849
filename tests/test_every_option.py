"""Every option of every built-in pass, end to end through the CLI, generated from the options' declarations.

For each pass in the registry (the test-only ones left out), each option and each class of value it declares
(``Pass.option_specs()``, passes/options.py): every ``Literal`` choice, true and false, a numeric option's bounds
(just inside an open one), the middle of a bounded range and a huge value for an unbounded one, and for a list of
names one entry that names a layer and one that names nothing. The pass runs with that one option set (plus the
option that makes it read it, ``COMPANIONS``) on a shipped model. The property: exit 0 with a model that passes
onnx.checker, exit 1 with nothing written, or exit 2 with one line — never 3, never a traceback. A value equal to
the option's default runs once per pass, with no option at all.

A name entry that matches nothing must say so: one note in the pass's report and a warning. An option set without
the one that makes the pass read it (``COMPANIONS``) is refused before any work (exit 2), as is bins with
method=minmax and align with rank. Passes make graph constants only through ``passes.base.constant``.

The end-to-end runs are independent, and one after another they took a third of the suite's time: they start
together on a pool of worker processes (one per CPU, ``end_to_end_runs``), each test waiting for its own run.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import re
import typing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import pytest

import graphopt.passes.catalog  # noqa: F401  (registers the built-in passes)
from graphopt.cli import main
from graphopt.errors import UsageError
from graphopt.passes.base import constant
from graphopt.passes.options import OptionSpec
from graphopt.pipeline import registry
from graphs import MODELS, assert_one_line_error

PASSES_DIR = Path(__file__).resolve().parent.parent / "passes"

# The built-in passes: those that live in graphopt.passes (tests register others, named test-*).
BUILT_IN = {name: cls for name, cls in sorted(registry().items())
            if cls.__module__.startswith("graphopt.passes.") and not name.startswith("test-")}

# The model each pass runs on: the MLP is the fastest to quantize; the CNN has Conv/BN for prune, fold and fuse,
# and small Gemm weights (fast SVDs) for svd.
MODEL = {"quantize": "mnist_mlp", "quantize-dynamic": "mnist_mlp", "quantize-weights": "mnist_mlp",
         "svd": "mnist_mlp",            # the CNN's k×k convolutions make each svd run slow (tests/test_svd_conv.py)
         "prune-layers": "mnist_vit"}   # the ViT has residual blocks
DEFAULT_MODEL = "mnist_cnn"

# Options a pass reads only when another option is set: that one is set too.
COMPANIONS = {
    ("quantize", "percentile"): "method=percentile",
    ("svd", "damping"): "data-aware=true",
    ("prune-channels", "samples"): "reconstruct=true",
    ("prune-channels", "damping"): "reconstruct=true",
    ("prune-channels", "rows-per-sample"): "reconstruct=true",
    ("cluster-weights", "samples"): "data-aware=true",
    ("quantize-weights", "samples"): "method=gptq",
}

# Values of the options that name layers (str lists): (value, whether it names something in the pass's model).
NAMES: dict[tuple[str, str], list[tuple[str, bool]]] = {
    ("prune-channels", "exclude"): [("/res_*/*/Conv", True), ("conv1", False)],
    ("prune-channels", "layers"): [("/tail/tail.0/Conv:0.5", True), ("conv1:0.5", False)],
    ("quantize", "exclude"): [("/net/net.3/Gemm", True), ("Gemm", True), ("conv1", False)],
    ("svd", "exclude"): [("/net/net.3/Gemm", True), ("conv1", False)],
    ("prune-weights", "exclude"): [("/tail/tail.0/Conv", True), ("conv1", False)],
    ("cluster-weights", "exclude"): [("/head/head.1/Gemm", True), ("conv1", False)],
    ("quantize-dynamic", "exclude"): [("Gemm", True), ("conv1", False)],
    ("quantize-weights", "exclude"): [("Gemm", True), ("conv1", False)],
    ("prune-layers", "exclude"): [("/blocks/blocks.0/Add", True), ("conv1", False)],
}

HUGE = 10 ** 9      # for a bound that is not there


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _numbers(spec: OptionSpec, typ: type) -> list[Any]:
    """The bounds of a numeric option (just inside an open one; a huge value where there is none) and, for a
    bounded range, its middle."""
    integer = typ is int
    lo, hi = spec.lo, spec.hi
    values: list[Any] = []
    if lo is None:
        values.append(-HUGE)
    elif spec.lo_open:
        values.append(int(lo) + 1 if integer else math.nextafter(lo, math.inf))
    else:
        values.append(lo)
    if hi is None:
        values.append(HUGE)
    elif spec.hi_open:
        values.append(int(hi) - 1 if integer else math.nextafter(hi, -math.inf))
    else:
        values.append(hi)
    if lo is not None and hi is not None:
        values.append((lo + hi) // 2 if integer else (lo + hi) / 2)
    return [int(v) if integer else float(v) for v in values]


def option_values(pass_name: str, spec: OptionSpec) -> list[str]:
    """Every class of value ``spec`` declares, as CLI text (see the module docstring)."""
    if spec.is_list:
        assert spec.members == (str,), f"{pass_name}:{spec.name}: list of {spec.members} — add its values here"
        assert (pass_name, spec.name) in NAMES, f"{pass_name}:{spec.name} names layers: add example values to NAMES"
        return [v for v, _ in NAMES[pass_name, spec.name]]
    values: list[Any] = []
    for member in spec.members:
        if typing.get_origin(member) is Literal:
            values += typing.get_args(member)
        elif member is bool:
            values += [True, False]
        elif member in (int, float):
            values += _numbers(spec, member)
        else:
            raise AssertionError(f"{pass_name}:{spec.name}: no values for {member!r} — add them here")
    if spec.optional and spec.default is not None:
        values.append("none")
    return list(dict.fromkeys(_text(v) for v in values))


def _cases() -> list[tuple[str, str]]:
    """(pass, spec) pairs: each pass with no option, then each value that is not the default."""
    cases = []
    for name, cls in BUILT_IN.items():
        cases.append((name, name))
        for spec in cls.option_specs():
            companion = COMPANIONS.get((name, spec.name))
            for raw in option_values(name, spec):
                if spec.parse(raw, name) == spec.default and not spec.is_list:
                    continue                 # the run with no option covers it
                options = [f"{spec.name}={raw}"] + ([companion] if companion else [])
                cases.append((name, f"{name}:{','.join(dict.fromkeys(options))}"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8 samples of the MNIST calibration set (with their labels): calibration and validation data (the
    test is about every option running, not about fidelity: fits on 8 samples are degenerate and say so)."""
    path = tmp_path_factory.mktemp("data") / "calib8.npz"
    with np.load(MODELS / "mnist_calib.npz") as data:
        np.savez(path, **{k: data[k][:8] for k in data.files})
    return path


def test_the_built_in_passes_are_all_here():
    assert {"fold-bn", "fold-constants", "fuse-conv-relu", "prune-channels", "prune-layers", "quantize",
            "svd"} <= set(BUILT_IN)


def test_tables_name_real_options():
    for table in (COMPANIONS, NAMES):
        for pass_name, option in table:
            assert option in {s.name for s in BUILT_IN[pass_name].option_specs()}, (pass_name, option)
    for (pass_name, _), companion in COMPANIONS.items():
        key, _, raw = companion.partition("=")
        spec = next(s for s in BUILT_IN[pass_name].option_specs() if s.name == key)
        assert spec.parse(raw, pass_name) != spec.default


@pytest.mark.parametrize("pass_name", sorted(BUILT_IN))
def test_every_declared_value_parses_or_is_a_usage_error(pass_name):
    """The values the end-to-end cases use (and the defaults they skip) are the option's own: they parse, or are
    rejected as usage errors (e.g. bins=32832, not a power of two), never anything else; ``none`` is None."""
    for spec in BUILT_IN[pass_name].option_specs():
        for raw in option_values(pass_name, spec):
            try:
                value = spec.parse(raw, pass_name)
            except UsageError:
                continue
            assert value is not None or raw == "none"
        if spec.optional:
            assert spec.parse("none", pass_name) is None


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """The CLI in-process (in a worker), with what it prints on stdout and stderr (as the ``cli`` fixture)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture(scope="module")
def end_to_end_runs(request: pytest.FixtureRequest, small_calib: Path, tmp_path_factory: pytest.TempPathFactory):
    """spec -> (the output path, the future of its CLI run): every selected case's run, submitted at once to a
    pool of (fresh, spawned) worker processes, one per CPU up to 4, in the order the tests run."""
    specs = [item.callspec.params["spec"] for item in request.session.items
             if item.originalname == "test_option_end_to_end"]
    assert len(set(specs)) == len(specs)
    root = tmp_path_factory.mktemp("runs")
    pool = ProcessPoolExecutor(min(_cpus(), 4), mp_context=multiprocessing.get_context("spawn"))
    runs: dict[str, tuple[Path, Future]] = {}
    for i, spec in enumerate(specs):
        model = MODELS / f"{MODEL.get(spec.partition(':')[0], DEFAULT_MODEL)}.onnx"
        out = root / f"{i}.onnx"
        args = [str(model), str(out), "--pass", spec, "--calib-data", str(small_calib), "--latency-runs", "0"]
        runs[spec] = out, pool.submit(run_cli, args)
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("pass_name,spec", CASES, ids=[s for _, s in CASES])
def test_option_end_to_end(end_to_end_runs, pass_name, spec):
    out, run = end_to_end_runs[spec]
    code, stdout, stderr = run.result()
    assert code in (0, 1, 2), f"exit {code}:\n{stderr}"
    assert "Traceback" not in stdout + stderr
    if code == 0:
        onnx.checker.check_model(str(out))
    elif code == 1:
        assert not out.exists(), "targets missed but the model was written"
    else:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for (name, option), values in NAMES.items():
        for value, matches in values:
            if pass_name == name and spec == f"{name}:{option}={value}":
                name_part = value.rpartition(":")[0] if option == "layers" else value
                said = f"{option}: '{name_part}' matches no"
                assert (said in stdout) != matches, stdout
                assert (said in stderr) != matches, stderr       # the warning


def _without_companion(pass_name: str, option: str) -> str:
    """The option set to its first declared value other than the default, without its companion."""
    spec = next(s for s in BUILT_IN[pass_name].option_specs() if s.name == option)
    raw = next(v for v in option_values(pass_name, spec) if spec.parse(v, pass_name) != spec.default)
    return f"{pass_name}:{option}={raw}"


@pytest.mark.parametrize("spec,needle", [
    *((_without_companion(p, o), c) for (p, o), c in COMPANIONS.items() if p != "prune-channels"),
    # prune-channels reads them under reconstruct=auto (the default) when data is given: refused only when off
    *((_without_companion(p, o) + ",reconstruct=false", "reconstruct=false turns off")
      for (p, o) in COMPANIONS if p == "prune-channels"),
    ("svd:rank=4,align=8", "rank is taken as given"),
    ("quantize:method=minmax,bins=128", "method is minmax"),
])
def test_an_option_that_would_change_nothing_is_a_usage_error(cli, tmp_path, spec, needle):
    """An option read only under another one (``COMPANIONS``), set without it, is refused before any work."""
    r = cli(MODELS / "mnist_mlp.onnx", tmp_path / "out.onnx", "--pass", spec, "--latency-runs", "0")
    assert_one_line_error(r, 2, needle)


def test_the_no_match_note_suggests_the_name_meant(cli, tmp_path, small_calib):
    r = cli(MODELS / "mnist_mlp.onnx", tmp_path / "out.onnx", "--pass", "quantize:exclude=/net/net.1/gemm",
            "--calib-data", small_calib, "--latency-runs", "0")
    assert r.code == 0, r.err
    assert "exclude: '/net/net.1/gemm' matches no node (did you mean '/net/net.1/Gemm'?)" in r.out


def test_constant_takes_any_computed_value():
    scalar = np.maximum(np.array(1.0), np.array(2.0)).astype(np.float32)     # numpy gives np.float32, not 0-d
    assert not isinstance(scalar, np.ndarray)
    c = constant("s", scalar)
    assert isinstance(c.values, np.ndarray) and c.values.shape == () and c.values.dtype == np.float32
    assert constant("z", 3, np.int8).values.dtype == np.int8
    t = constant("t", np.arange(6.0).reshape(2, 3).T, np.float32).values
    assert t.shape == (3, 2) and t.flags["C_CONTIGUOUS"] and t.dtype == np.float32


def test_passes_make_constants_only_through_base_constant():
    """onnx-graphsurgeon takes only an ndarray as a constant's values, and numpy returns a scalar from arithmetic
    on 0-d arrays (quantize:per-channel=false crashed on it): passes make constants with passes.base.constant (or
    put a value in with as_values), never gs.Constant or Tensor.to_constant on a value of their own."""
    bad = []
    for path in sorted(PASSES_DIR.rglob("*.py")):
        if path.name == "base.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"gs\.Constant\(", line) or re.search(r"\.to_constant\((?!as_values\()", line):
                bad.append(f"{path.relative_to(PASSES_DIR.parent)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
