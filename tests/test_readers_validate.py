"""Data readers (npz cutting rules, folders, labels, streaming) and validation metrics / MAC counts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.calibration.readers import LABELS_KEY, Batch, IterableSource, model_inputs, open_source
from graphs import conv_model
from graphopt.errors import InputError
from graphopt.runtime import count_macs
from graphopt.validate import Thresholds, validate


def _model(shape, dtype=TensorProto.FLOAT):
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(source):
    return [(b.feed["x"].shape, None if b.labels is None else b.labels.tolist()) for b in source]


def test_npz_dynamic_batch_cut_in_rows(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.arange(70 * 2, dtype=np.float32).reshape(70, 2), **{LABELS_KEY: np.arange(70)})
    src = open_source(p, _model(["N", 2]))
    feeds = list(src)
    assert [f.feed["x"].shape for f in feeds] == [(16, 2)] * 4 + [(6, 2)]
    assert feeds[4].labels.tolist() == list(range(64, 70))
    np.testing.assert_array_equal(np.concatenate([f.feed["x"] for f in feeds]), np.load(p)["x"])
    assert [f.feed["x"].shape for f in open_source(p, _model(["N", 2]), max_samples=5)] == [(5, 2)]


def test_npz_fixed_batch_and_stacked(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((6, 3, 4), np.float32))
    assert _feeds(open_source(p, _model([3, 3, 4]))) == [((3, 3, 4), None)] * 2   # fixed batch of 3
    assert _feeds(open_source(p, _model([3, 4]))) == [((3, 4), None)] * 6         # one more axis: one feed each
    with pytest.raises(InputError, match="not a multiple"):
        open_source(p, _model([4, 3, 4]))
    with pytest.raises(InputError, match="does not match"):
        open_source(p, _model(["N", 5]))


def test_npz_casts_safely_and_refuses_unsafe(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((2, 2), np.float64))
    assert next(iter(open_source(p, _model(["N", 2])))).feed["x"].dtype == np.float32
    np.savez(p, x=np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match="dtype"):
        list(open_source(p, _model(["N", 2], TensorProto.INT64)))


def test_folder_source(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=np.full((1, 2), i, np.float32), **{LABELS_KEY: np.array([i])})
    feeds = list(open_source(tmp_path, _model(["N", 2])))
    assert [f.feed["x"][0, 0] for f in feeds] == [0, 1, 2]
    assert [f.labels.tolist() for f in feeds] == [[0], [1], [2]]


def test_npz_streams_rows_not_whole_arrays(tmp_path, monkeypatch):
    """Only the rows of the current batch are read: the whole array is never materialised."""
    p = tmp_path / "big.npz"
    np.savez(p, x=np.ones((1000, 64), np.float32))
    import numpy.lib.npyio as npyio

    def refuse(self, key):  # NpzFile.__getitem__ would load the whole array
        raise AssertionError(f"whole array {key} loaded")

    monkeypatch.setattr(npyio.NpzFile, "__getitem__", refuse)
    total = sum(b.feed["x"].shape[0] for b in open_source(p, _model(["N", 64])))
    assert total == 1000


def test_validation_metrics_known_values():
    ref = conv_model()
    scaled = onnx.ModelProto()
    scaled.CopyFrom(ref)
    for t in scaled.graph.initializer:
        if t.name == "fc_w":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), "fc_w"))
        if t.name == "fc_b":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), "fc_b"))
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 3, 8, 8)).astype(np.float32)} for i in range(3)]

    src = IterableSource(feeds, model_inputs(ref))
    res = validate(ref, scaled, src, exact=False, thresholds=Thresholds(min_cosine=0.999))
    out = res.outputs[0]
    assert out.cosine == pytest.approx(1.0, abs=1e-6)        # y' = 1.5 y: same direction
    assert out.rel_error == pytest.approx(0.5, rel=1e-5)     # max|y'-y| / max|y| = 0.5
    assert out.sqnr_db == pytest.approx(10 * np.log10(1 / 0.25), rel=1e-4)
    assert out.top1 == 1.0 and res.passed and res.samples == 12
    strict = validate(ref, scaled, src, exact=True, thresholds=Thresholds())
    assert not strict.passed and "exact pipeline" in strict.failures[0]
    gated = validate(ref, scaled, src, exact=False, thresholds=Thresholds(max_rel_error=0.1))
    assert not gated.passed and "--max-rel-error" in gated.failures[0]


def test_top1_only_for_softmax_outputs_when_the_model_has_them():
    """An MTCNN-like head: box offsets [N, 4] from a Gemm beside a Softmax face score [N, 2]. Top-1 agreement (and
    --min-top1) is about the Softmax only; the boxes' argmax would fail the gate for nothing."""
    rng = np.random.default_rng(0)
    w_box, w_cls = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w_box"], ["box"]), helper.make_node("Gemm", ["x", "w_cls"], ["l"]),
             helper.make_node("Softmax", ["l"], ["prob"], axis=1)]
    vi = lambda n, c: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c])  # noqa: E731
    graph = helper.make_graph(nodes, "head", [vi("x", 8)], [vi("box", 4), vi("prob", 2)],
                              [numpy_helper.from_array(w_box, "w_box"), numpy_helper.from_array(w_cls, "w_cls")])
    ref = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    noisy = onnx.ModelProto()
    noisy.CopyFrom(ref)
    noisy.graph.initializer[0].CopyFrom(numpy_helper.from_array(w_box + rng.standard_normal((8, 4)).astype(
        np.float32), "w_box"))                      # the boxes change a lot, the face score not at all
    src = IterableSource([{"x": rng.standard_normal((64, 8)).astype(np.float32)}], model_inputs(ref))
    res = validate(ref, noisy, src, exact=False, thresholds=Thresholds(min_top1=0.95))
    assert res.outputs[0].top1 is None and res.outputs[1].top1 == 1.0 and res.passed


def test_validation_catches_nan_and_shape_change():
    ref = _model([2, 2])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    nan = helper.make_model(helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [x], [y]),
                            opset_imports=[helper.make_opsetid("", 17)])
    nan.ir_version = 8
    feeds = [Batch({"x": -np.ones((2, 2), np.float32)}, None)]
    res = validate(ref, nan, feeds, exact=False, thresholds=Thresholds())
    assert any("NaN/Inf" in f for f in res.failures)
    y4 = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    shape = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g", [x], [y4],
        [numpy_helper.from_array(np.array([4]), "s")]), opset_imports=[helper.make_opsetid("", 17)])
    shape.ir_version = 8
    res = validate(ref, shape, feeds, exact=False, thresholds=Thresholds())
    assert any("shape changed" in f for f in res.failures)


def test_mac_counts():
    # Conv: |Y| * Cin/g * k*k ; Gemm: M*N*K ; MatMul: |Y| * K ; ConvTranspose: |X| * Cout/g * k*k
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "t", "m")]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),   # group 2
             numpy_helper.from_array(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "wt"),
             numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "mm")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["x", "wt"], ["t"], strides=[2, 2]),
             helper.make_node("MatMul", ["x", "mm"], ["m"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    feed = {"x": np.zeros((1, 4, 8, 8), np.float32)}
    conv = 6 * 8 * 8 * 2 * 9
    convt = 4 * 8 * 8 * 3 * 4
    matmul = 4 * 8 * 5 * 8
    assert count_macs(m, feed) == conv + convt + matmul


def _cancelling_bn_net(beta: float = -20.0, explicit: bool = False) -> onnx.ModelProto:
    """Conv (bias 1e5) -> BatchNormalization (mean 1e5) -> Sigmoid: the logits are a small difference of large
    numbers, so float32 rounding moves them by ~0.01 and the ~1e-9 Sigmoid outputs by percents. ``explicit`` spells
    the BatchNormalization as Sub/Mul/Add, which onnxruntime does not fold into the Conv."""
    f = np.float32
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.1).astype(f), "w"),
             numpy_helper.from_array(np.full(4, 1e5, f), "b"), numpy_helper.from_array(np.full(4, 3.0, f), "gamma"),
             numpy_helper.from_array(np.full(4, beta, f), "beta"), numpy_helper.from_array(np.full(4, 1e5, f), "mean"),
             numpy_helper.from_array(np.ones(4, f), "var")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])]
    if explicit:
        inits += [numpy_helper.from_array(np.full((1, 4, 1, 1), 1e5, f), "mean4"),
                  numpy_helper.from_array(np.full((1, 4, 1, 1), 3.0 / np.sqrt(1 + 1e-5), f), "scale4"),
                  numpy_helper.from_array(np.full((1, 4, 1, 1), beta, f), "beta4")]
        nodes += [helper.make_node("Sub", ["c", "mean4"], ["s"]), helper.make_node("Mul", ["s", "scale4"], ["m"]),
                  helper.make_node("Add", ["m", "beta4"], ["n"])]
    else:
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]))
    nodes.append(helper.make_node("Sigmoid", ["n"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_exact_validation_allows_onnxruntimes_own_rounding_spread_and_nothing_more():
    """Written out as Sub/Mul/Add the model is the same function, but rounds as onnxruntime does with its
    optimizations off, well past 1e-4 of the output here: that passes, because the input model itself differs that
    much between optimization levels. A real change (beta 0.5 lower) still fails."""

    ref = _cancelling_bn_net()
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    src = IterableSource(feeds, model_inputs(ref))
    same = validate(ref, _cancelling_bn_net(explicit=True), src, exact=True, thresholds=Thresholds())
    out = same.outputs[0]
    assert out.rel_error > 1e-3 and out.noise_rel >= out.rel_error / 2 and same.passed, (out.rel_error, out.noise_rel)
    changed = validate(ref, _cancelling_bn_net(beta=-20.5, explicit=True), src, exact=True, thresholds=Thresholds())
    assert not changed.passed and "rounding spread" in changed.failures[0]


def test_exact_validation_counts_the_rewritten_models_own_rounding_spread():
    """The other way round: the input spells the BatchNormalization out (onnxruntime leaves it as it is, so the
    input model has no spread), the rewrite is the BatchNormalization onnxruntime folds into the Conv. The rewritten
    model's own spread is what the difference is made of, so it passes; a real change still fails."""

    ref = _cancelling_bn_net(explicit=True)
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32)} for i in range(3)]
    src = IterableSource(feeds, model_inputs(ref))
    same = validate(ref, _cancelling_bn_net(), src, exact=True, thresholds=Thresholds())
    out = same.outputs[0]
    assert out.rel_error > 1e-3 and out.noise_rel >= out.rel_error / 2 and same.passed, (out.rel_error, out.noise_rel)
    changed = validate(ref, _cancelling_bn_net(beta=-20.5), src, exact=True, thresholds=Thresholds())
    assert not changed.passed and "rounding spread" in changed.failures[0]


def test_top1_per_position_for_a_sequence_softmax():
    """[N, T, C] Softmax over the last axis (a CTC recogniser): top-1 agreement counts positions. The same-shaped
    output of a MatMul is no class score and gets none."""

    f = np.float32
    w = np.random.default_rng(0).standard_normal((6, 5)).astype(f)

    def net(weight: np.ndarray, softmax: bool = True) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["l" if softmax else "y"])]
        if softmax:
            nodes.append(helper.make_node("Softmax", ["l"], ["y"], axis=-1))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 6])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 5])],
                                  [numpy_helper.from_array(weight, "w")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 7, 6)).astype(f)} for i in range(3)]
    src = IterableSource(feeds, model_inputs(net(w)))
    swapped = w.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]          # classes 0 and 1 exchanged
    res = validate(net(w), net(swapped), src, exact=False, thresholds=Thresholds(min_top1=0.99))
    logits = np.concatenate([b["x"] for b in feeds]) @ w
    best = logits.argmax(-1)
    expected = np.mean((best != 0) & (best != 1))    # positions whose winner is neither of the two
    assert res.outputs[0].top1 == pytest.approx(expected) and 0 < expected < 1
    assert not res.passed and "top-1" in res.failures[0]
    plain = validate(net(w, False), net(swapped, False), src, exact=False, thresholds=Thresholds())
    assert plain.outputs[0].top1 is None


def test_npz_fixed_batch_sizes_must_agree_and_max_samples_keeps_whole_batches(tmp_path):
    """A sample limit that is not a multiple of a fixed batch size gave a short last feed, which onnxruntime
    refused; two inputs of different fixed batch sizes gave "different numbers of samples"."""
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((6, 3, 4), np.float32))
    assert _feeds(open_source(p, _model([3, 3, 4]), max_samples=5)) == [((3, 3, 4), None)]
    assert _feeds(open_source(p, _model([3, 3, 4]), max_samples=1)) == [((3, 3, 4), None)]
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])
    two = helper.make_model(helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [a, b],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]),
                            opset_imports=[helper.make_opsetid("", 17)])
    np.savez(p, a=np.zeros((6, 4), np.float32), b=np.zeros((6, 4), np.float32))
    with pytest.raises(InputError, match="different fixed batch sizes"):
        open_source(p, two)
