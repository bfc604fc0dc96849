"""prune-layers: removing whole residual blocks, the least harmful first, with the next layer refitted.

It fires on the block whose removal hurts least (golden op list); removing a block whose branch computes zero is
exact in onnxruntime (optimizations off), and the refit brings the outputs closer to the original's when the
branch did not; Adds that are not residual blocks (projection shortcut, side outputs, a broadcast) are declined with
the reason and the graph untouched; a second run finds nothing to remove; count=auto keeps the targets.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.readers import open_source
from graphopt.passes.base import PassContext
from graphopt.passes.prune_layers import BLOCKS_REMOVED
from graphopt.pipeline import make_spec, run_pipeline
from graphopt.validate import Thresholds
from graphs import assert_one_line_error, assert_same_outputs, declined, ops, parse_model, residual_calib, residual_net, run, \
    same_graph

AFTER_BLOCK0 = ["Conv", "Relu", "Relu", "Conv", "Relu", "Conv", "Add", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]


def prune(model: onnx.ModelProto, targets: Thresholds | None = None, **opts):
    ctx = PassContext(original=model, calib=open_source(residual_calib(), model))
    if targets is not None:
        ctx.targets = targets
    return run_pipeline(model, [make_spec("prune-layers", opts)], ctx)


def cosine_to(model: onnx.ModelProto, other: onnx.ModelProto) -> float:
    a = np.concatenate([run(model, d)[0] for d in residual_calib()]).ravel().astype(np.float64)
    b = np.concatenate([run(other, d)[0] for d in residual_calib()]).ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fires_on_the_least_harmful_block_and_the_refit_helps():
    model = residual_net(scales=(0.05, 1.0))
    out, records = prune(model, count=1)
    result = records[-1].result
    assert ops(out) == AFTER_BLOCK0 and result.counts[BLOCKS_REMOVED] == 1
    rows = {r["layer"]: r for r in result.layers if r["op"] == "Add"}
    assert rows["block0_add"]["status"] == "removed" and rows["block1_add"]["status"] == "kept"
    assert rows["block0_add"]["cosine alone"] > rows["block1_add"]["cosine alone"]
    assert rows["block0_add"]["branch weights"] == 8 * 8 * 9 * 2 + 8
    refit = next(r for r in result.layers if r["op"] == "Conv")
    assert refit["layer"] == "block1_conv_a" and refit["rel error after"] < refit["rel error before"]
    plain, _ = prune(model, count=1, refit=False)
    assert cosine_to(model, out) > cosine_to(model, plain)
    onnx.checker.check_model(out, full_check=True)


def test_removing_a_zero_branch_is_exact():
    model = residual_net(scales=(0.0, 1.0))
    out, records = prune(model, count=1)            # the refit of the next layer keeps its exact weights
    assert ops(out) == AFTER_BLOCK0
    assert_same_outputs(model, out, rtol=1e-4)


def test_declines_with_the_reason_and_leaves_the_graph_untouched():
    cases = {"projection": "no identity input: neither input lies on the other's path",
             "side-output": "the branch has side outputs: 'r0a' is a graph output",
             "broadcast": "shapes differ: identity 'h0' ['N', 8, 6, 6] vs branch 'fm' ['N', 8, 1, 1]"}
    for shortcut, why in cases.items():
        model = residual_net(scales=(0.05,), shortcut=shortcut)
        out, records = prune(model, count=1)
        reasons = declined(records)
        assert same_graph(model, out) and not records[-1].result.changed
        assert reasons[0].startswith("Add 'block0_add': " + why) and reasons[-1].startswith("model: no residual")


def test_second_run_changes_nothing():
    once, _ = prune(residual_net(), count=2)
    assert "Add" not in ops(once)
    twice, records = prune(once, count=2)
    assert same_graph(once, twice) and declined(records) == [
        "model: no residual blocks (an Add of an activation x and a branch computed from x)"]


def test_count_auto_keeps_the_targets_and_needs_them():
    model = residual_net(scales=(0.0, 3.0))
    out, records = prune(model)
    note = records[-1].result.notes[0]
    assert note.startswith("count=auto: ") and ops(out) == AFTER_BLOCK0, note   # the zero branch only
    out, records = prune(model, targets=Thresholds())
    assert same_graph(model, out) and "no target to search against" in declined(records)[0]


def test_cli_bad_count(cli, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual_net(), path)
    assert_one_line_error(cli(path, tmp_path / "o.onnx", "--pass", "prune-layers:count=0"), 2, "count")


def test_chained_blocks_are_removed_together():
    """x1 = x0 + f(x0), x2 = x1 + g(x1) (a transformer's chain of Adds): removing the first rewires the second block
    to x0, which must be found again before the second is removed (it used to leave a dangling input)."""
    rng = np.random.default_rng(0)
    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 3] y) <float[8, 8] w1, float[8, 8] w2, float[8, 3] w3> {
            f = MatMul(x, w1)
            x1 = Add(x, f)
            h = MatMul(x1, w2)
            x2 = Add(x1, h)
            y = MatMul(x2, w3)
        }""", w1=(rng.standard_normal((8, 8)) * 0.01).astype(np.float32),
        w2=(rng.standard_normal((8, 8)) * 0.01).astype(np.float32), w3=rng.standard_normal((8, 3)).astype(np.float32))
    data = [{"x": rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(original=model, calib=open_source(data, model))
    out, records = run_pipeline(model, [make_spec("prune-layers", {"count": 2})], ctx)
    assert records[-1].result.counts[BLOCKS_REMOVED] == 2 and ops(out) == ["MatMul"]
    onnx.checker.check_model(out, full_check=True)
    assert cosine_to_data(model, out, data) > 0.99


def cosine_to_data(model: onnx.ModelProto, other: onnx.ModelProto, data: list) -> float:
    a = np.concatenate([run(model, d)[0] for d in data]).ravel().astype(np.float64)
    b = np.concatenate([run(other, d)[0] for d in data]).ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
