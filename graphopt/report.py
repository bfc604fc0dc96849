"""Model statistics and the before/after report (stdout table and JSON); MACs and latency come from
graphopt.runtime."""

from __future__ import annotations

import hashlib
import platform
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from . import __version__, io
from .graph import STANDARD, graph_protos
from .tensor_data import data_bytes
from .attribution import StepLoss
from .runtime import count_macs, cpu_info
from .validate import ValidationResult


@dataclass
class ModelStats:
    size_bytes: int
    parameters: int           # elements of the stored tensors
    parameter_bytes: int      # their bytes as stored (int8 weights: one each)
    macs: int | None
    nodes: int
    op_counts: dict[str, int]
    zipped_bytes: int | None = None    # the file under zlib level 6 (how models ship); None over 2 GB


def zipped_size(model: onnx.ModelProto) -> int | None:
    """Bytes of the serialized model after zlib at level 6 (zip's DEFLATE default), or None for a model over the
    protobuf limit: zeros and repeated weights (prune-weights, cluster-weights) shrink there, not in the file.
    Kept per serialized content (its BLAKE2 digest, ~1 GB/s against zlib's ~30 MB/s): a sweep or a session of runs
    on one input compresses it once."""
    if io.is_big(model):
        return None
    data = model.SerializeToString()
    return _zipped(hashlib.blake2b(data, digest_size=16).digest(), data)


_ZIPPED: dict[bytes, int] = {}


def _zipped(digest: bytes, data: bytes) -> int:
    if digest not in _ZIPPED:
        if len(_ZIPPED) >= 256:
            _ZIPPED.clear()
        _ZIPPED[digest] = len(zlib.compress(data, 6))
    return _ZIPPED[digest]


def environment() -> dict[str, Any]:
    return {"graphopt": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "cpu": cpu_info()}


def count_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """Elements and bytes of every stored tensor: initializers (sparse ones too) and Constant-node tensors, in the
    main graph and its subgraphs (If/Loop/Scan bodies). Bytes as stored: 4-bit types two to a byte, strings by their
    length, sparse tensors as their values and indices. Weights packed into uint8 bytes for onnxruntime's
    MatMulNBits / GatherBlockQuantized count as the values they hold (8 / bits per byte), not as bytes."""
    elements = stored = 0
    for g in graph_protos(model.graph):
        packed = _packed_values_per_byte(g)
        tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" and n.domain in STANDARD
                                         for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        for t in tensors:
            per_byte = packed.get(t.name, 1) if t.data_type == onnx.TensorProto.UINT8 else 1
            elements += int(np.prod(t.dims, dtype=np.int64)) * per_byte
            stored += data_bytes(t)
        for sp in g.sparse_initializer:
            elements += int(np.prod(sp.dims, dtype=np.int64))
            stored += data_bytes(sp.values) + data_bytes(sp.indices)
    return elements, stored


def _packed_values_per_byte(g: onnx.GraphProto) -> dict[str, int]:
    """uint8 weights and zero points of com.microsoft.MatMulNBits (inputs 1, 3) and GatherBlockQuantized (0, 3):
    values per byte."""
    packed: dict[str, int] = {}
    for n in g.node:
        if n.domain == "com.microsoft" and n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            weight, zero_points = (n.input[1] if n.op_type == "MatMulNBits" else n.input[0]), n.input[3:4]
            for name in (weight, *zero_points):
                packed[name] = max(8 // bits, 1)
    return packed


def model_stats(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None) -> ModelStats:
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    parameters, parameter_bytes = count_parameters(model)
    return ModelStats(size_bytes=io.model_size_bytes(model), parameters=parameters, parameter_bytes=parameter_bytes,
                      macs=count_macs(model, feed) if feed is not None else None,
                      nodes=len(model.graph.node), op_counts=dict(sorted(ops.items())), zipped_bytes=zipped_size(model))


@dataclass
class Report:
    """Everything the CLI prints and ``--report`` writes."""

    input: str
    output: str | None
    passes: list[dict[str, Any]] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    latency_ms: tuple[float, float] | None = None
    latency_setup: dict[str, Any] = field(default_factory=dict)
    validation: ValidationResult | None = None
    losses: list[StepLoss] = field(default_factory=list)     # which lossy pass lost what (several lossy passes)
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=environment)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input, "output": self.output, "environment": self.environment,
            "passes": self.passes,
            "before": asdict(self.before) if self.before else None,
            "after": asdict(self.after) if self.after else None,
            "latency_ms": {"before": self.latency_ms[0], "after": self.latency_ms[1], **self.latency_setup}
            if self.latency_ms else None,
            "validation": self.validation.to_dict() if self.validation else None,
            "losses_by_pass": [s.to_dict() for s in self.losses],
            "warnings": self.warnings,
        }

    def format(self, *, header: bool = True, steps: bool = True) -> str:
        return format_report(self, header=header, steps=steps)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    if a == b:
        return "="
    if a == 0:
        return "new"
    return f"{(b - a) / a * 100:+.1f}%"


def _num(x: float | None, fmt: str) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf"
    return format(x, fmt)


def format_header(env: dict[str, Any]) -> str:
    """The report's first line: versions and the CPU the figures were measured on."""
    cpu = env["cpu"]
    return (f"graphopt {env['graphopt']} | onnxruntime {env['onnxruntime']} | CPU: {cpu['model']} "
            f"({', '.join(cpu['isa']) or 'no AVX2'}; {cpu['cores']} cores)")


def format_step(p: dict[str, Any]) -> list[str]:
    """One pipeline step (a row of ``Report.passes``): its line, then its declines and notes."""
    counts = ", ".join(f"{k} {_count(v) if isinstance(v, (int, float)) and v >= 1000 else v}"
                       for k, v in p["counts"].items())
    extra = f"; {len(p['declined'])} declined" if p["declined"] else ""
    removed = f"; cleanup removed {p['removed_nodes']} nodes" if p["removed_nodes"] else ""
    lines = [f"  {p['pass']:<28} {p['seconds']:.2f} s  {counts or 'no change'}{extra}{removed}"]
    lines += [f"      declined {d['site']}: {d['reason']}" for d in p["declined"][:8]]
    if len(p["declined"]) > 8:
        lines.append(f"      ... and {len(p['declined']) - 8} more (see --report)")
    return lines + [f"      {note}" for note in p.get("notes", [])]


def format_report(r: Report, *, header: bool = True, steps: bool = True) -> str:
    """The whole report; the CLI prints the header and the steps as they come (``header``/``steps`` False)."""
    lines = [format_header(r.environment)] if header else []
    lines += [f"warning: {w}" for w in r.warnings]
    if r.passes and steps:
        lines.append("pipeline:")
        for p in r.passes:
            lines += format_step(p)
    b, a = r.before, r.after
    if b and a:
        lines.append("")
        lines.append(f"{'':<22}{'before':>14}{'after':>14}{'change':>10}")
        rows = [("file size", _size(b.size_bytes), _size(a.size_bytes), _change(b.size_bytes, a.size_bytes)),
                ("  zipped (zlib -6)", _size(b.zipped_bytes or 0), _size(a.zipped_bytes or 0),
                 _change(b.zipped_bytes, a.zipped_bytes)),
                ("parameters", _count(b.parameters), _count(a.parameters), _change(b.parameters, a.parameters)),
                ("parameter bytes", _size(b.parameter_bytes), _size(a.parameter_bytes),
                 _change(b.parameter_bytes, a.parameter_bytes)),
                ("MACs", _count(b.macs), _count(a.macs), _change(b.macs, a.macs)),
                ("nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes))]
        if r.latency_ms:
            lb, la = r.latency_ms
            rows.append((f"latency ms ({r.latency_setup.get('threads')} thr)", f"{lb:.3f}", f"{la:.3f}",
                         f"{lb / la:.2f}x" if la > 0 else ""))
        for name, x, y, c in rows:
            lines.append(f"{name:<22}{x:>14}{y:>14}{c:>10}")
        ops = sorted(set(b.op_counts) | set(a.op_counts))
        changed_ops = [op for op in ops if b.op_counts.get(op, 0) != a.op_counts.get(op, 0)]
        for op in changed_ops:
            lines.append(f"  {op:<20}{b.op_counts.get(op, 0):>14}{a.op_counts.get(op, 0):>14}")
        if r.latency_ms:
            s = r.latency_setup
            how = f"runs, {s['order']}," if "order" in s else "interleaved runs"   # models over 2 GB: in turn
            lines.append(f"  (latency: median of {s.get('runs')} {how} after {s.get('warmup')} warm-up, "
                         f"input {s.get('feed_shapes')}, {s.get('optimization')})")
    v = r.validation
    if v is not None:
        lines.append("")
        verdict = "PASSED" if v.passed else "FAILED"
        mode = "exact pipeline" if v.exact else "lossy pipeline"
        lines.append(f"validation on {v.data} ({v.feeds} feeds, {v.samples} samples, {mode}): {verdict}")
        lines.append(f"  {'output':<20}{'max abs':>11}{'rel err':>11}{'cosine':>10}{'SQNR dB':>9}{'top-1':>9}")
        for o in v.outputs:
            lines.append(f"  {o.name[:20]:<20}{_num(o.max_abs_error, '.3g'):>11}{_num(o.rel_error, '.3g'):>11}"
                         f"{_num(o.cosine, '.6f'):>10}{_num(o.sqnr_db, '.1f'):>9}"
                         f"{_num(None if o.top1 is None else o.top1 * 100, '.2f'):>9}")
        lines += _fidelity_lines(v)
        acc = v.accuracy
        if acc:
            lines.append(f"  accuracy on labels ({v.labelled} samples): {acc[0] * 100:.2f}% -> {acc[1] * 100:.2f}% "
                         f"({(acc[1] - acc[0]) * 100:+.2f} points)")
        if r.losses:
            lines.append("  fidelity by lossy pass (on the same data):")
            lines += [f"    {step}" for step in r.losses]
        for f in v.failures:
            lines.append(f"  FAIL: {f}")
    return "\n".join(lines)


def _fidelity_lines(v: ValidationResult) -> list[str]:
    """The worst slice of each sliced output, what the top-1 of a --scores output is taken over, the task metric."""
    lines = []
    for o in v.outputs:
        worst = o.slices.worst() if o.slices is not None else None
        if o.slices is not None and o.slices.terms is not None:
            flat = int(o.slices.flat().sum())
            what = (f"worst slice {worst[0]}: cosine {worst[1]:.6f}" if worst is not None else "every slice flat")
            lines.append(f"  {o.name}: {what} ({len(o.slices.labels)} slices along axis {o.slices.spec.axis}"
                         f"{f', {flat} flat, not gated' if flat else ''})")
        if o.score_axis is not None and o.top1 is not None:
            lines.append(f"  {o.name}: top-1 per position over axis {o.score_axis}: {o.top1 * 100:.2f}% of "
                         f"{o.top1_rows} positions agree")
    if v.metric is not None:
        name, reference, value = v.metric
        lines.append(f"  metric {name}: {value:.6g} (float's own: {reference:.6g}, {value - reference:+.6g})")
    return lines


def summary(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None, path: str, data: str) -> str:
    """A model's summary for ``graphopt info``; MACs counted on ``feed``, the first sample of ``data``."""
    st = model_stats(model, feed)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    lines = [f"{path}", f"  IR version {model.ir_version}; opsets: {opsets}; producer: "
             f"{model.producer_name or '-'} {model.producer_version}".rstrip(),
             f"  file size {_size(st.size_bytes)}, parameters {_count(st.parameters)} ({_size(st.parameter_bytes)}), MACs {_count(st.macs)}"
             f"{' (per run on ' + str({k: list(v.shape) for k, v in feed.items()}) + f' from {data})' if feed else ''}",
             f"  nodes {st.nodes}: " + ", ".join(f"{op} {n}" for op, n in sorted(st.op_counts.items(),
                                                                             key=lambda kv: -kv[1]))]
    for vi in model.graph.input:
        lines.append(f"  input  {vi.name}: {_type_str(vi)}")
    for vi in model.graph.output:
        lines.append(f"  output {vi.name}: {_type_str(vi)}")
    return "\n".join(lines)


def _type_str(vi: onnx.ValueInfoProto) -> str:
    t = vi.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dt = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
        if not tt.HasField("shape"):
            return f"{dt}[unknown rank]"
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return f"{dt}[{', '.join(dims)}]"
    return str(t.WhichOneof("value"))
