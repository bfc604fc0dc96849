"""Every module of the project imports on its own, in a fresh interpreter (no import cycle depends on order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for pkg in ("graphopt", "passes", "calibration") for p in (ROOT / pkg).glob("*.py")
                 if p.stem != "__main__")   # __main__ runs the CLI


def test_every_module_imports_first():
    failures = []
    for module in MODULES:
        r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            failures.append(f"{module}: {r.stderr.strip().splitlines()[-1]}")
    assert not failures, failures
    assert "graphopt.api" in MODULES and "calibration.readers" in MODULES
