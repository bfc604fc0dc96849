"""Models over the 2 GB protobuf limit, without 2 GB files: ``graphopt.io.PROTOBUF_LIMIT`` is lowered to 100 kB so
a model with a few 100 kB weights takes the big-model path everywhere (loaded and checked by path, its weights left
in the input's file and read one at a time by the passes, sessions from files, saved with external data copied
tensor by tensor, its size counted without serializing). The ``limit`` fixture also makes the entry
points that would serialize a model whole (onnxruntime from bytes, ``onnx.checker`` and shape inference in memory)
fail on such a model, as protobuf does on a real one: a code path that forgets the limit fails here too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import api, runtime, tensor_data, validate
from graphopt import graph as gograph
from graphopt import io
from graphopt.passes.lowrank.factor import decompose, truncation_error
from graphs import assert_one_line_error, make_model, node, rand

LIMIT = 100_000
K = 160          # a [K, K] float weight is 102 kB, over the lowered limit alone


@pytest.fixture
def limit(monkeypatch):
    """Lower the limit; the in-memory entry points refuse models over it, as protobuf refuses models over 2 GB."""
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", LIMIT)

    def over(model) -> bool:
        return isinstance(model, onnx.ModelProto) and io.tensor_bytes(model) > LIMIT

    def guard(real, arg_index=0):
        def wrapped(*args, **kwargs):
            arg = args[arg_index]
            if over(arg) or (isinstance(arg, bytes) and len(arg) > LIMIT):
                raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB (test limit)")
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ort, "InferenceSession", guard(ort.InferenceSession))
    monkeypatch.setattr(onnx.checker, "check_model", guard(onnx.checker.check_model))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", guard(onnx.shape_inference.infer_shapes))


def big_model() -> onnx.ModelProto:
    """A fresh copy of ``_big_model()`` (built before any test lowers the limit: make_model runs the checker)."""
    model = onnx.ModelProto()
    model.CopyFrom(_BIG)
    return model


def _big_model() -> onnx.ModelProto:
    """x[1, K] -> MatMul W1 -> Relu -> MatMul W2 -> MatMul W3 -> Mul(Add(c, one)) -> y: 307 kB of weights, a small
    constant subgraph for fold-constants and a per-channel Mul after a rank-2 MatMul for fold-bn."""
    nodes = [node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.full(K, 0.5, np.float32))),
             node("Add", ["c", "one"], ["scale"]),
             node("MatMul", ["x", "W1"], ["h1"]), node("Relu", ["h1"], ["r1"]),
             node("MatMul", ["r1", "W2"], ["h2"]), node("MatMul", ["h2", "W3"], ["h3"]),
             node("Mul", ["h3", "scale"], ["y"])]
    weights = {f"W{i}": rand(K, K, seed=i, lo=-0.08, hi=0.08) for i in (1, 2, 3)}
    return make_model(nodes, inputs=[("x", [1, K])], outputs=[("y", [1, K])],
                      initializers={**weights, "one": np.ones(K, np.float32)})


_BIG = _big_model()


@pytest.fixture
def big_path(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    p = folder / "big.onnx"
    onnx.save_model(big_model(), p, save_as_external_data=True, location="big.onnx.data")
    return p


def outputs_of(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)


def assert_saved_external(out: Path) -> None:
    """OUT and OUT.data are there, OUT is checker-valid by path and holds no tensor of 1 KiB or more itself."""
    assert out.is_file() and (out.parent / (out.name + ".data")).is_file()
    onnx.checker.check_model(str(out))
    skeleton = onnx.load(out, load_external_data=False)
    assert out.stat().st_size < LIMIT
    for t in skeleton.graph.initializer:
        if tensor_data.data_bytes(t) >= tensor_data.EXTERNAL_MIN_BYTES:
            assert onnx.external_data_helper.uses_external_data(t), t.name
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_default_pipeline_runs_end_to_end(cli, limit, big_path, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    res = cli(big_path, out, "--report", rep, "--latency-runs", "2")
    assert res.code == 0, res.err
    assert_saved_external(out)
    feed = {"x": rand(1, K, seed=9)}
    np.testing.assert_allclose(outputs_of(out, feed)[0], outputs_of(big_path, feed)[0], rtol=1e-5, atol=1e-6)
    report = json.loads(rep.read_text())
    steps = {s["pass"]: s for s in report["passes"]}
    assert steps["fold-constants"]["counts"] == {"Constant nodes lowered": 1, "nodes folded": 1}
    assert steps["fold-bn"]["counts"] == {"Mul folded into MatMul": 1}
    written = out.stat().st_size + (tmp_path / "out.onnx.data").stat().st_size
    assert abs(report["after"]["size_bytes"] - written) < 100   # the data file's name is the one difference
    assert report["validation"]["passed"]


def test_fold_constants_evaluates_a_big_constant_subgraph_from_a_file(cli, limit, tmp_path):
    """A Transpose of a big weight is folded: the constant subgraph alone is over the limit."""
    model = make_model([node("Transpose", ["W"], ["Wt"], perm=[1, 0]), node("MatMul", ["x", "Wt"], ["y"])],
                       inputs=[("x", [1, K])], outputs=[("y", [1, K])],
                       initializers={"W": rand(K, K), "V": rand(K, K, seed=2)}, check=False)
    p = tmp_path / "t.onnx"
    onnx.save_model(model, p, save_as_external_data=True)
    out = tmp_path / "o.onnx"
    assert cli(p, out, "--latency-runs", "0").code == 0
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded.graph.initializer[0]), rand(K, K).T)


@pytest.mark.parametrize("spec", ["svd", "quantize"])
def test_lossy_passes_run_or_refuse_in_one_line(cli, limit, big_path, tmp_path, spec):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rand(32, K, seed=4))
    out = tmp_path / "o.onnx"
    res = cli(big_path, out, "--pass", spec, "--calib-data", calib, "--latency-runs", "0", "--force")
    if res.code == 0:
        assert_saved_external(out)
    else:
        assert_one_line_error(res, 2, "over the 2 GB protobuf limit")
        assert not out.exists()


def test_big_model_is_checked_by_path_at_load(limit, big_path, monkeypatch):
    seen = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (seen.append(type(m)), real(m, *a, **k)))
    model = io.load_model(big_path)
    assert seen == [str] and io.is_big(model)
    assert {t.name for t in model.graph.initializer} == {"W1", "W2", "W3", "one"}


def test_an_invalid_big_model_is_refused_in_one_line(limit):
    model = big_model()
    model.graph.node[2].op_type = "NoSuchOp"
    with pytest.raises(io.InputError, match="after pass 'x': invalid ONNX model: .*NoSuchOp"):
        io.check_model(model, "after pass 'x'")


def test_write_external_keeps_every_tensor_and_leaves_the_model_alone(tmp_path, monkeypatch):
    """Initializers, Constant-node tensors and subgraph tensors go external and read back the same; the model is
    unchanged; model_size_bytes counts the files written."""
    model = big_model()
    model.graph.node.append(node("If", ["cond"], ["z"], then_branch=onnx.helper.make_graph(
        [node("Identity", ["T"], ["z1"])], "then", [], [onnx.helper.make_tensor_value_info("z1", 1, [K, K])],
        [onnx.numpy_helper.from_array(rand(K, K, seed=7), "T")]), else_branch=onnx.helper.make_graph(
        [node("Identity", ["W1"], ["z2"])], "else", [], [onnx.helper.make_tensor_value_info("z2", 1, [K, K])])))
    monkeypatch.setattr(tensor_data, "ALIGN_MIN_BYTES", 50_000)
    before = model.SerializeToString()
    written = io.write_external(model, tmp_path / "m.onnx")
    assert model.SerializeToString() == before
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    skeleton = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert all(onnx.external_data_helper.uses_external_data(t) for t in
               onnx.external_data_helper._get_all_tensors(skeleton) if int(np.prod(t.dims)) * 4 >= 1024)
    back = onnx.load(tmp_path / "m.onnx")
    for a, b in zip(onnx.external_data_helper._get_all_tensors(model),
                    onnx.external_data_helper._get_all_tensors(back)):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    offsets = [int(e.value) for t in skeleton.graph.initializer if t.name.startswith("W")
               for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 3 and all(o % tensor_data.ALIGN == 0 for o in offsets)


def test_model_size_counts_what_is_saved(limit, tmp_path):
    model = big_model()
    written = io.save_model(model, tmp_path / "model.onnx")   # the data file's name as model_size_bytes counts it
    assert len(written) == 2
    assert io.model_size_bytes(model) == sum(p.stat().st_size for p in written)


def test_normal_models_are_not_big():
    model = big_model()
    assert not io.is_big(model)
    assert io.model_size_bytes(model) == model.ByteSize()


@pytest.fixture
def reads(monkeypatch):
    """Every weight a pass reads from the input's files (graph.read_tensor), with how many weights read before it
    were still in memory when it was read."""
    log: list[tuple[str, int]] = []
    alive: list[weakref.ref] = []
    real = gograph.read_tensor

    def counted(t):
        log.append((t.name, sum(1 for r in alive if r() is not None)))
        arr = real(t)
        alive.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(gograph, "read_tensor", counted)
    return log


def _digest(folder: Path) -> dict[str, tuple[str, float]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in folder.iterdir()}


def test_a_big_model_is_held_without_its_weights(limit, big_path):
    model = io.load_model(big_path)
    held = [t for t in model.graph.initializer if tensor_data.file_location(t)]
    assert sorted(t.name for t in held) == ["W1", "W2", "W3"]
    assert all(not t.raw_data for t in held) and model.ByteSize() < 20_000
    assert io.is_big(model) and io.model_size_bytes(model) > 3 * K * K * 4


def test_fold_constants_reads_no_weight_and_writes_them_all(cli, limit, big_path, tmp_path, reads):
    """The whole run (checks after the pass, validation, latency, saving) reads no weight into Python; the output's
    data file holds every weight, byte for byte, without the input's files, which are left as they were."""
    before = _digest(big_path.parent)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = cli(big_path, out, "--pass", "fold-constants", "--latency-runs", "2")
    assert res.code == 0, res.err
    assert reads == []
    assert _digest(big_path.parent) == before
    assert (big_path.parent / "big.onnx.data").stat().st_nlink == 1    # the sessions' links are gone
    feed = {"x": rand(1, K, seed=9)}
    expected = outputs_of(big_path, feed)[0]
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(big_path).graph.initializer}
    shutil.rmtree(big_path.parent)
    assert_saved_external(out)
    np.testing.assert_array_equal(outputs_of(out, feed)[0], expected)
    for t in onnx.load(out).graph.initializer:
        if t.name in original:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), original[t.name])


def test_a_weight_read_from_its_file_cannot_be_edited_in_place(limit, big_path):
    graph = gograph.import_graph(io.load_model(big_path))
    w = graph.tensors()["W1"]
    assert isinstance(w, gograph.FileConstant)
    np.testing.assert_array_equal(w.values, rand(K, K, seed=1, lo=-0.08, hi=0.08))
    with pytest.raises(ValueError, match="read-only"):
        w.values[0, 0] = 1.0
    w.values = np.zeros((K, K), np.float32)       # replacing the values is how a pass changes a weight
    assert not np.any(w.values)


def test_a_big_model_run_holds_one_session_at_a_time(cli, limit, big_path, tmp_path, monkeypatch):
    """Every onnxruntime session of the run (input check, validation and its rounding spread, MAC counts, latency)
    is dropped before the next one is made: the original and the result run one after the other."""
    live = [0, 0]    # now, most at once

    class Tracked:
        def __init__(self, sess):
            self.sess = sess
            live[0] += 1
            live[1] = max(live)

        def __del__(self):
            live[0] -= 1

        def __getattr__(self, name):
            return getattr(self.sess, name)

    for module in (api, runtime, validate):
        real = module.make_session
        monkeypatch.setattr(module, "make_session", lambda *a, _real=real, **k: Tracked(_real(*a, **k)))
    res = cli(big_path, tmp_path / "o.onnx", "--latency-runs", "2")
    assert res.code == 0, res.err
    assert "one model after the other" in res.out
    assert live == [0, 1]


# ------------------------------------------------------------------------- lossy passes over 2 GB (issue 25, item 3)


def _conv_model() -> onnx.ModelProto:
    """x[1, 64, 6, 6] -> 3x3 Conv C1 -> Relu -> 3x3 Conv C2 -> y: two k x k conv sites of 147 kB each."""
    nodes = [node("Conv", ["x", "C1"], ["h"], pads=[1, 1, 1, 1]), node("Relu", ["h"], ["r"]),
             node("Conv", ["r", "C2"], ["y"], pads=[1, 1, 1, 1])]
    weights = {f"C{i}": rand(64, 64, 3, 3, seed=i, lo=-0.05, hi=0.05) for i in (1, 2)}
    return make_model(nodes, inputs=[("x", [1, 64, 6, 6])], outputs=[("y", [1, 64, 6, 6])], initializers=weights)


_CONV = _conv_model()
NEW_PASSES = [(_BIG, "quantize-weights", 3), (_BIG, "quantize-dynamic", 3), (_BIG, "svd:rank=32", 3),
              (_CONV, "svd:rank=16", 2)]


@pytest.mark.parametrize("source,spec,weights", NEW_PASSES, ids=[s for _, s, _ in NEW_PASSES])
def test_a_lossy_pass_reads_one_weight_at_a_time_and_writes_the_small_paths_graph(request, tmp_path, source, spec,
                                                                                weights):
    """On a big model the pass reads each weight once, none still held when the next is read; the weights it made
    are held in a file, not in memory; the output is the graph the in-memory path writes, value for value."""
    model = onnx.ModelProto()
    model.CopyFrom(source)
    small, _ = api.optimize(model, [spec], validate_output=False, latency_runs=0)   # before the limit is lowered
    request.getfixturevalue("limit")
    reads = request.getfixturevalue("reads")
    p = tmp_path / "big.onnx"
    onnx.save_model(model, p, save_as_external_data=True, location="big.onnx.data")
    out, report = api.optimize(p, [spec], gate=False, latency_runs=0)
    assert report.validation is not None and report.before is not None and report.before.macs
    assert len(reads) == weights and len({name for name, _ in reads}) == weights
    assert all(alive == 0 for _, alive in reads), reads
    assert all(tensor_data.file_location(t) or tensor_data.data_bytes(t) < tensor_data.EXTERNAL_MIN_BYTES
               for t in tensor_data.all_tensors(out))
    io.save_model(out, tmp_path / "o.onnx")
    assert_saved_external(tmp_path / "o.onnx")
    saved = onnx.load(tmp_path / "o.onnx")
    assert [(n.op_type, list(n.input)) for n in saved.graph.node] == [(n.op_type, list(n.input))
                                                                      for n in small.graph.node]
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in small.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("spec,why", [
    ("quantize-weights:method=gptq", "method=gptq gathers every layer's K x K input second moment at once"),
    ("svd:rank=auto", "rank=auto judges each candidate's session beside the input's"),
    ("svd:data-aware=true", "data-aware=true gathers every layer's K x K input second moment at once")])
def test_options_that_hold_more_than_one_weight_are_refused_on_a_big_model(cli, limit, big_path, tmp_path, spec,
                                                                           why):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rand(8, K, seed=4))
    out = tmp_path / "o.onnx"
    res = cli(big_path, out, "--pass", spec, "--calib-data", calib)
    assert_one_line_error(res, 2, f"pass '{spec}' cannot run on a model over the 2 GB protobuf limit: {why}")
    assert not out.exists()


def _spectrum(k: int, n: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((k, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(sigma))))[0]
    return (u * sigma) @ v.T


@pytest.mark.parametrize("shape", [(96, 600), (600, 96)])
def test_gram_factors_are_as_exact_as_the_full_svd(shape):
    """svd factorizes through the eigen-decomposition of the smaller Gram matrix (lowrank.factor.gram_svd): its
    rank-r error matches the full SVD's within 1e-8 of the norm on a spectrum falling to 1e-13·σ₁ (squaring loses
    the singular values below ~1e-8·σ₁) and to rounding on a flat one."""
    falling = _spectrum(*shape, 10.0 ** (-np.arange(96) / 7.3), seed=1)
    flat = np.random.default_rng(2).standard_normal(shape)
    for w, tol in ((falling, 1e-8), (flat, 1e-12)):
        sigma = np.linalg.svd(w, compute_uv=False)
        dec = decompose(w)
        assert np.max(np.abs(dec.s - sigma)) <= tol * sigma[0]
        for r in (1, 8, 32, 95, 96):
            a, b = dec.factors(r)
            assert a.shape == (shape[0], r) and b.shape == (r, shape[1])
            err = np.linalg.norm(w - a @ b) / np.linalg.norm(w)
            assert abs(err - truncation_error(sigma, r)) <= tol, (r, err)
