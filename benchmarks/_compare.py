"""Pipelines side by side at the pipeline's default targets (helper of bench_svd's ``convs`` section and
bench_layers): each run through ``graphopt.api.optimize`` as the CLI runs it (calibration data, validation on
held-out data, ``force`` so that a result that misses the targets is still measured), one row per run: MACs and file
size before/after, the latency ratio the report measured (onnxruntime CPU, 1 intra-op thread, interleaved runs,
medians; against the input model in the same run), the worst output cosine and the accuracy on held-out labels,
whether validation passed, and how long the pipeline took.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from graphopt.api import optimize

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CACHE = Path.home() / ".cache" / "graphopt-bench"

# name: (model, calibration data, held-out data)
CASES: dict[str, tuple[Path, Path, Path]] = {
    "mnist_cnn": (MODELS / "mnist_cnn.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
    "mnist_wide": (MODELS / "mnist_wide.onnx", MODELS / "mnist64_calib.npz", MODELS / "mnist64_eval.npz"),
    "mnist_vit": (MODELS / "mnist_vit.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
    **{name: (CACHE / f"{name}.onnx", CACHE / f"{name}_calib.npz", CACHE / f"{name}_eval.npz")
       for name in ("ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls", "mtcnn_rnet", "mtcnn_onet")},
    "minilm": (CACHE / "minilm" / "minilm.onnx", CACHE / "minilm" / "minilm_calib.npz",
               CACHE / "minilm" / "minilm_eval.npz"),
}


def run(case: str, passes: list[str], latency_runs: int = 300) -> dict[str, Any]:
    """One pipeline on one case; the row (``missing`` when the model is not fetched)."""
    model, calib, val = CASES[case]
    if not model.exists():
        return {"case": case, "passes": " ".join(passes), "missing": True}
    t0 = time.perf_counter()
    _, report = optimize(model, passes, calib_data=calib, val_data=val, force=True, latency_runs=latency_runs)
    seconds = time.perf_counter() - t0
    r = report.to_dict()
    v = r["validation"] or {}
    cosines = [o["cosine"] for o in v.get("outputs", []) if o.get("cosine") is not None]
    lat = r.get("latency_ms") or {}
    changed = {k: v for step in r["passes"] for k, v in step["counts"].items()
               if k in ("layers factorized", "residual blocks removed", "channels removed")}
    notes = [n for step in r["passes"] for n in step["notes"] if n.startswith(("rank=auto", "ratio=auto", "count="))]
    return {"case": case, "passes": " ".join(passes), "macs": (r["before"]["macs"], r["after"]["macs"]),
            "size": (r["before"]["size_bytes"], r["after"]["size_bytes"]),
            "speedup": lat["before"] / lat["after"] if lat.get("after") else None,
            "cosine": min(cosines) if cosines else None,
            "accuracy": (v.get("accuracy_before"), v.get("accuracy_after")), "passed": v.get("passed"),
            "changed": changed, "seconds": seconds, "chosen": [n.split(",")[0] for n in notes]}


def _pct(before: float | None, after: float | None) -> str:
    return "" if not before or after is None else f"{100 * (after / before - 1):+.1f}%"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a markdown table."""
    out = ["| model | pipeline | chosen | changed | MACs | size | speed-up | cosine | accuracy | held-out | time |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("missing"):
            out.append(f"| {r['case']} | `{r['passes']}` | model not fetched | | | | | | | | |")
            continue
        acc = r["accuracy"]
        acc_text = f"{100 * acc[0]:.2f}% → {100 * acc[1]:.2f}%" if acc[0] is not None else "—"
        changed = ", ".join(f"{v:g} {k}" for k, v in r["changed"].items()) or "nothing"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        cosine = "" if r["cosine"] is None else f"{r['cosine']:.4f}"
        out.append(f"| {r['case']} | `{r['passes']}` | {'; '.join(r['chosen'])} | {changed} | {_pct(*r['macs'])} | "
                   f"{_pct(*r['size'])} | {speed} | {cosine} | {acc_text} | {'passes' if r['passed'] else 'misses'} "
                   f"| {r['seconds']:.0f} s |")
    return out


def write(lines: list[str], path: Path | None) -> int:
    """Print the markdown and, given ``path``, write it there."""
    text = "\n".join(lines) + "\n"
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0
