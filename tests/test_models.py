"""Checks on the committed test models in models/ (built by models/build.py).

The decoder (models/build_decoder.py) is checked against the perplexity and next-byte top-1 in manifest.json.

Only onnx, onnxruntime and numpy are used here (no torch, no mlxtend): the
models and data sets are committed artefacts, these tests make sure they are
present, structurally what graphopt's passes expect, and still as accurate as
documented in models/README.md.
"""

from __future__ import annotations

import json
import math
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graphopt.runtime import count_macs

MODELS = Path(__file__).parent.parent / "models"
MAX_BYTES = 5 * 1024 * 1024

# Documented onnxruntime eval accuracies (models/README.md); a model must
# reach at least this minus TOLERANCE on its eval set.
TOLERANCE = 0.002
SPECS = {
    "mnist_cnn": dict(
        res=28, accuracy=0.981, min_macs=1_000_000,
        ops={"Conv", "BatchNormalization", "Relu", "Add", "Concat", "Clip",
             "Flatten", "Gemm", "MaxPool"},
    ),
    "mnist_mlp": dict(
        res=28, accuracy=0.967, min_macs=400_000,
        ops={"Flatten", "Gemm", "Relu"},
    ),
    "mnist_vit": dict(
        res=28, accuracy=0.976, min_macs=1_000_000,
        ops={"MatMul", "LayerNormalization", "Softmax", "Add", "Reshape",
             "Transpose", "ReduceMean", "Gemm"},
    ),
    "mnist_wide": dict(
        res=64, accuracy=0.980, min_macs=25_000_000,
        ops={"Conv", "BatchNormalization", "Relu", "MaxPool",
             "GlobalAveragePool", "Flatten", "Gemm"},
    ),
}
DATASETS = {28: ("mnist_calib.npz", "mnist_eval.npz"),
            64: ("mnist64_calib.npz", "mnist64_eval.npz")}

_cache: dict = {}


def load_model(name: str) -> onnx.ModelProto:
    if name not in _cache:
        _cache[name] = onnx.load(str(MODELS / f"{name}.onnx"))
    return _cache[name]


def load_npz(fname: str) -> tuple[np.ndarray, np.ndarray]:
    if fname not in _cache:
        with np.load(MODELS / fname) as z:
            _cache[fname] = (z["input"], z["__labels__"])
    return _cache[fname]


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def producers(m):
    return {o: n for n in m.graph.node for o in n.output}


def consumers(m, tensor):
    return [n for n in m.graph.node if tensor in n.input]


# ---------------------------------------------------------------- data sets
@pytest.mark.parametrize("res", sorted(DATASETS))
def test_datasets(res):
    calib, ev = (load_npz(f) for f in DATASETS[res])
    for (x, y), n in ((calib, 500), (ev, 1000)):
        assert x.dtype == np.float32 and x.shape == (n, 1, res, res)
        assert y.dtype == np.int64 and y.shape == (n,)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert np.array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
        # shuffled: a small prefix already covers every class
        assert len(set(y[:100].tolist())) == 10
    # calibration and evaluation images are disjoint
    seen = {row.tobytes() for row in calib[0].reshape(len(calib[0]), -1)}
    assert not any(row.tobytes() in seen for row in ev[0].reshape(len(ev[0]), -1))
    for f in DATASETS[res]:
        assert (MODELS / f).stat().st_size < MAX_BYTES


def test_datasets_64_match_28():
    """The 64x64 sets are the same digits (same order) as the 28x28 ones."""
    for f28, f64 in zip(DATASETS[28], DATASETS[64]):
        (x28, y28), (x64, y64) = load_npz(f28), load_npz(f64)
        assert np.array_equal(y28, y64)
        # bilinear 28->64 upscale keeps the image mass roughly (x 64^2/28^2)
        ratio = x64.sum(axis=(1, 2, 3)) / x28.sum(axis=(1, 2, 3)) / (64 / 28) ** 2
        assert np.all(np.abs(ratio - 1) < 0.05)


# ------------------------------------------------------------------- graphs
@pytest.mark.parametrize("name", sorted(SPECS))
def test_graph_contract(name):
    spec = SPECS[name]
    path = MODELS / f"{name}.onnx"
    assert path.stat().st_size < MAX_BYTES
    m = load_model(name)
    onnx.checker.check_model(m, full_check=True)
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in m.opset_import)
    g = m.graph
    init = inits(m)
    ins = [i for i in g.input if i.name not in init]
    assert [i.name for i in ins] == ["input"]
    assert [o.name for o in g.output] == ["logits"]
    t = ins[0].type.tensor_type
    assert t.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in t.shape.dim] == ["batch", 1, spec["res"], spec["res"]]
    t = g.output[0].type.tensor_type
    assert t.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in t.shape.dim] == ["batch", 10]

    ops = Counter(n.op_type for n in g.node)
    assert spec["ops"] <= set(ops), spec["ops"] - set(ops)
    # weights are initializers, no training-only ops, no leftovers
    assert not set(ops) & {"Constant", "Dropout", "Identity"}
    if name != "mnist_vit":
        assert "Softmax" not in ops  # logits are raw scores
    for n in g.node:
        assert n.domain in ("", "ai.onnx")
        if n.op_type in ("Conv", "Gemm", "BatchNormalization", "LayerNormalization"):
            assert all(i in init for i in n.input[1:] if i), n.name
        if n.op_type == "BatchNormalization":
            assert len(n.output) == 1 and attr(n, "training_mode", 0) == 0
    one = {g.input[0].name: np.zeros((1, 1, spec["res"], spec["res"]), np.float32)}
    macs = count_macs(m, one)
    assert macs is not None and macs >= spec["min_macs"]
    manifest = json.loads((MODELS / "manifest.json").read_text())["models"][name.removeprefix("mnist_")]
    assert macs == manifest["macs_per_sample"]   # models/build.py counted them with the same function


def test_cnn_pruning_patterns():
    m = load_model("mnist_cnn")
    init, prod = inits(m), producers(m)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]

    def through(t, skip=("BatchNormalization", "Relu", "Clip")):
        """Follow a tensor back through BN/activation to the Conv producing it."""
        n = prod.get(t)
        while n is not None and n.op_type in skip:
            n = prod.get(n.input[0])
        return n

    # Conv -> BatchNormalization -> Relu blocks
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) >= 5 and all(prod[b.input[0]].op_type == "Conv" for b in bns)
    assert any(consumers(m, b.output[0])[0].op_type == "Relu" for b in bns)
    # depthwise Conv (group == channels > 1) followed by a 1x1 pointwise Conv
    dw = [c for c in convs if attr(c, "group", 1) > 1]
    assert dw
    for c in dw:
        w = init[c.input[1]]
        assert attr(c, "group") == w.shape[0] and w.shape[1] == 1
        nxt = [n for n in m.graph.node if n.op_type == "Conv" and through(n.input[0]) is c]
        assert nxt and list(attr(nxt[0], "kernel_shape")) == [1, 1]
    # residual Add of two conv branches
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert any(all(through(i) is not None and through(i).op_type == "Conv" for i in a.input)
               for a in adds)
    # Concat of two conv branches on the channel axis
    cats = [n for n in m.graph.node if n.op_type == "Concat"]
    assert any(attr(c, "axis") == 1 and len(c.input) == 2 and
               all(through(i) is not None and through(i).op_type == "Conv" for i in c.input)
               for c in cats)
    # Clip == ReLU6
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert clips
    for c in clips:
        assert float(init[c.input[1]]) == 0.0 and float(init[c.input[2]]) == 6.0
    # Flatten -> Gemm head
    flat = [n for n in m.graph.node if n.op_type == "Flatten"]
    assert flat and consumers(m, flat[0].output[0])[0].op_type == "Gemm"


def test_mlp_wide_gemms():
    m = load_model("mnist_mlp")
    init = inits(m)
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    widths = sorted(max(init[g.input[1]].shape) for g in gemms)
    assert len(gemms) == 3 and widths[-1] >= 512 and widths[-2] >= 256


def test_vit_attention_matmuls():
    m = load_model("mnist_vit")
    init = inits(m)
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    const_w = [n for n in mm if n.input[1] in init]
    act_act = [n for n in mm if not set(n.input) & set(init)]
    assert len(const_w) >= 8 and len(act_act) >= 2
    shapes = [init[n.input[1]].shape for n in const_w]
    assert max(max(s) for s in shapes) >= 256        # MLP width
    assert any(s[0] == 7 * 7 and s[1] >= 128 for s in shapes)  # 7x7 patch embedding
    # Softmax feeds an activation x activation MatMul (attention @ V)
    for s in (n for n in m.graph.node if n.op_type == "Softmax"):
        assert any(c in act_act for c in consumers(m, s.output[0]))


# ----------------------------------------------------------------- accuracy
def _session(name):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(MODELS / f"{name}.onnx"), so,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eval_accuracy(name):
    spec = SPECS[name]
    x, y = load_npz(DATASETS[spec["res"]][1])
    sess = _session(name)
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 250]})[0]
                             for i in range(0, len(x), 250)])
    assert logits.shape == (len(x), 10) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= spec["accuracy"] - TOLERANCE, f"{name}: {acc:.4f} < {spec['accuracy']}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dynamic_batch(name):
    """batch 1 and batch 3 give the same per-sample logits."""
    spec = SPECS[name]
    x, _ = load_npz(DATASETS[spec["res"]][0])
    sess = _session(name)
    b3 = sess.run(["logits"], {"input": x[:3]})[0]
    b1 = np.concatenate([sess.run(["logits"], {"input": x[i:i + 1]})[0] for i in range(3)])
    assert b3.shape == (3, 10)
    np.testing.assert_allclose(b1, b3, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ decoder
DECODER_METRIC = runpy.run_path(str(MODELS / "decoder_metric.py"))


def test_decoder_scores_held_out_text_as_documented():
    """decoder.onnx loads, is the documented scorer (ids int64 [batch, 64] -> logits [batch, 64, 256], every weight
    MatMul on a constant initializer), and its perplexity and next-byte top-1 on the first 64 windows of
    decoder_eval.npz are the manifest's (the whole set takes too long here; build_decoder.py records both); the
    --metric function is 1.0 on the float outputs and below 1 on perturbed ones."""
    info = json.loads((MODELS / "manifest.json").read_text())["models"]["decoder"]
    path = MODELS / "decoder.onnx"
    assert path.stat().st_size < 4 * 1024 * 1024 and path.stat().st_size == info["bytes"]
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 64]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 64, 256]
    init = {i.name for i in m.graph.initializer}
    assert sum(n.op_type == "MatMul" and n.input[1] in init for n in m.graph.node) == 4 * 6 + 1
    assert not {n.op_type for n in m.graph.node} & {"Constant", "Identity", "Shape", "Dropout"}
    with np.load(MODELS / info["eval"]) as z:
        ids, after = z["ids"], z["__labels__"]
    assert ids.dtype == np.int64 and ids.shape == (256, 64) and after.shape == (256,)
    ids, after = ids[:info["eval_head_windows"]], after[:info["eval_head_windows"]]
    logits = _session("decoder").run(["logits"], {"ids": ids})[0]
    targets = np.concatenate([ids[:, 1:], after[:, None]], axis=1)
    ppl = math.exp(DECODER_METRIC["log_perplexity"](logits, targets))
    assert abs(ppl - info["eval_head_perplexity_ort"]) < 1e-3 * ppl, (ppl, info["eval_head_perplexity_ort"])
    assert abs(float((logits.argmax(-1) == targets).mean()) - info["eval_head_top1_ort"]) < 1e-4
    score = DECODER_METRIC["perplexity"]
    assert score({"logits": logits}, {"logits": logits}, after) == 1.0
    noisy = logits + np.random.default_rng(0).normal(0, 2, logits.shape).astype(np.float32)
    assert score({"logits": logits}, {"logits": noisy}, targets) < 1.0
