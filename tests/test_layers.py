"""The package's shape: imports go one way through the layers (no cycle, imports inside functions included), and
generic names in the user's working directory (calibration.py, passes.py) cannot shadow graphopt's own."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# folder in the repository -> the package it installs as (pyproject's package-dir)
PACKAGES = {"graphopt": "graphopt", "passes": "graphopt.passes", "calibration": "graphopt.calibration"}
# Bottom to top; a module may import its own layer and those below it.
LAYERS = [
    {"graphopt", "graphopt.errors", "graphopt.tensor_data", "graphopt.external_data", "graphopt.io", "graphopt.graph",
     "graphopt.scopes"},
    {"graphopt.runtime", "graphopt.metrics", "graphopt.validate", "graphopt.slices", "graphopt.taskmetric"},
    {"graphopt.calibration", "graphopt.calibration.feeds", "graphopt.calibration.checks", "graphopt.calibration.npz",
     "graphopt.calibration.readers", "graphopt.calibration.images", "graphopt.calibration.preprocess"},
    {"graphopt.calibration.*"},
    {"graphopt.passes", "graphopt.passes.*"},
    {"graphopt.pipeline", "graphopt.attribution", "graphopt.targets", "graphopt.report", "graphopt.api", "graphopt.cli",
     "graphopt.__main__", "graphopt.fixed_inputs", "graphopt.cli_options", "graphopt.sweep", "graphopt.sweep_output", "graphopt.plot"},
]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (importing a.b.c runs a and a.b too), except a
    package's PEP 562 ``__getattr__``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)} if path.name == "__init__.py" else set()
    named: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            named += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            named += [base] + [f"{base}.{a.name}" for a in node.names]
    deps = set()
    for m in named:
        parts = m.split(".")
        deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return deps - {name}


def layer(name: str) -> int:
    """The layer a module belongs to: where it is named, else where a ``package.*`` covers it."""
    exact = [i for i, members in enumerate(LAYERS) if name in members]
    covered = [i for i, members in enumerate(LAYERS) for m in members if m.endswith(".*") and name.startswith(m[:-1])]
    assert exact or covered, f"{name} is in no layer: add it to LAYERS"
    return (exact or covered)[0]


@functools.cache
def graph() -> dict[str, set[str]]:
    """Each module's project imports (parsed once: the tests only read it)."""
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_imports_go_down_the_layers():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not wrong, wrong


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}   # 1 on the stack, 2 done

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in sorted(g[v]):
            assert state.get(w) != 1, " -> ".join(path[path.index(w):] + [w]) if w in path else w
            if w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in sorted(g):
        if v not in state:
            visit(v, [v])


def test_the_graph_sees_the_real_edges():
    g = graph()
    assert "graphopt.passes.base" in g["graphopt.pipeline"]
    assert "graphopt.passes.catalog" in g["graphopt.pipeline"]
    assert "graphopt.validate" in g["graphopt.passes.base"] and "graphopt.graph" in g["graphopt.calibration.feeds"]
    for name in g:
        layer(name)


def test_user_files_named_like_our_packages_do_not_shadow_them(tmp_path: Path):
    """`python -m graphopt` puts the working directory first on sys.path; a user's calibration.py or passes.py
    there must not replace graphopt's packages (they are graphopt.calibration and graphopt.passes)."""
    for name in ("calibration", "passes", "graph", "runtime", "pipeline"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py was imported')\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    model = ROOT / "models" / "mnist_mlp.onnx"
    calib = tmp_path / "calib8.npz"       # quantize runs only to show the package loads: 8 samples do
    with np.load(ROOT / "models" / "mnist_calib.npz") as data:
        np.savez(calib, input=data["input"][:8])
    cli = subprocess.run([sys.executable, "-m", "graphopt", str(model), str(tmp_path / "out.onnx"), "--latency-runs",
                          "0", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "out.onnx").stat().st_size > 0
    api = subprocess.run([sys.executable, "-c", "import graphopt, onnx; m = onnx.load(r'%s'); "
                          "out, rep = graphopt.optimize(m, ['quantize'], calib_data=r'%s', latency_runs=0); "
                          "print(rep.passes[-1]['pass'])" % (model, calib)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == "quantize"


def test_every_package_is_installed():
    """pyproject lists the packages explicitly (passes/ and calibration/ map into graphopt): a new subpackage left
    out of the list would be missing from an installed graphopt while every test from the checkout passes."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert folders == listed, (folders - listed, listed - folders)
    for package, folder in config.get("package-dir", {}).items():
        assert PACKAGES[folder] == package
