"""svd: low-rank factorization of Gemm / MatMul / 1x1 Conv weights.

Exactness at full rank (onnxruntime, optimizations off) for every Gemm attribute combination, 3-D MatMul and 1x1
Conv; the math (weight error = discarded singular values; data-aware is optimal for the output error) as hypothesis
properties; declines with reasons; idempotence; the real MNIST MLP end to end through the CLI, and data-aware beating
plain SVD on its real calibration and evaluation data.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphopt.calibration.readers import open_source
from graphs import MODELS, assert_one_line_error
from graphopt.errors import UsageError
from graphopt.passes.base import PassContext
from graphopt.graph import export, import_graph
from graphopt.pipeline import make_spec, run_pipeline
from graphs import (assert_same_outputs, attrs, declined, initializer, make_model, node, ops, rand, random_feeds, rel_error, run, run_passes, same_graph)
from graphopt.passes.svd import CALIBRATION_SAMPLES, LAYERS_FACTORIZED, PARAMS_REMOVED, SVD
from graphopt.passes.lowrank.factor import SecondMoment, decompose, rank_for_error, relative_output_error, truncation_error

K, N = 48, 40  # r*(K+N) < K*N  <=>  r < 21.8


def low_rank(k: int, n: int, r: int, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """A k x n weight of numerical rank about r (a product of random factors plus a little noise)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r) + noise * rng.standard_normal((k, n))
    return w.astype(np.float32)


def full_rank(model: onnx.ModelProto, **opts) -> tuple[onnx.ModelProto, list[dict]]:
    """Factorize every site at full rank min(K, N), which never pays, through the internal ``require_gain`` switch."""
    graph = import_graph(model)
    p = SVD(SVD.Options(rank=10 ** 6, min_size=0, **opts))
    p.require_gain = False
    res = p.run(graph, PassContext(original=model))
    graph.cleanup().toposort()
    out = export(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, res.layers


def svd(model: onnx.ModelProto, **opts):
    """Run the pass through the real pipeline (cleanup, toposort, checker); return model, records, decline reasons."""
    out, records = run_passes(model, [("svd", {"min-size": 0, **opts})])
    return out, records, declined(records)


# ------------------------------------------------------------------------------------------------------ Gemm


def gemm_model(trans_a: int, trans_b: int, alpha: float, beta: float, bias: str, m: int = 5, opset: int = 17):
    w = low_rank(K, N, 8, seed=1)
    inits = {"fc.weight": w.T.copy() if trans_b else w}
    inputs = ["x", "fc.weight"]
    if bias != "none":
        inits["fc.bias"] = {"vector": rand(N, seed=2), "matrix": rand(m, N, seed=3),
                            "scalar": np.array(0.7, np.float32)}[bias]
        inputs.append("fc.bias")
    kw = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    x_shape = [K, m] if trans_a else [m, K]
    return make_model([node("Gemm", inputs, ["y"], name="fc", **kw)], [("x", x_shape)], ["y"], inits, opset=opset)


@pytest.mark.parametrize("bias", ["none", "vector", "matrix", "scalar"])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_full_rank_exact(trans_a, trans_b, bias):
    model = gemm_model(trans_a, trans_b, 0.5, 2.0, bias)
    out, layers = full_rank(model)
    assert ops(out) == ["Gemm", "Gemm"]
    first, second = out.graph.node
    assert first.input[0] == "x" and second.output[0] == "y"
    assert attrs(first).get("transA", 0) == trans_a and attrs(second).get("transA", 0) == 0
    assert attrs(second)["alpha"] == 0.5 and attrs(second)["beta"] == 2.0
    assert len(first.input) == 2 and list(second.input[2:]) == (["fc.bias"] if bias != "none" else [])
    assert layers[0]["rank"] == N and layers[0]["weight_error"] < 1e-6
    assert_same_outputs(model, out, rtol=1e-5)


def test_gemm_default_alpha_beta_and_old_opset():
    for model in (gemm_model(0, 1, 1.0, 1.0, "vector"), gemm_model(0, 1, 1.0, 1.0, "vector", opset=10)):
        out, layers = full_rank(model)
        assert ops(out) == ["Gemm", "Gemm"]
        assert_same_outputs(model, out, rtol=1e-5)
    first = out.graph.node[0]
    assert len(first.input) == 3 and not initializer(out, first.input[2]).any()  # opset 10: C required, zero


def test_gemm_reduced_rank_matches_the_truncated_weight():
    """At rank r the model computes exactly the Gemm with W replaced by its rank-r truncation A·B."""
    model = gemm_model(1, 1, 0.5, 2.0, "vector")
    out, records, reasons = svd(model, rank=8)
    assert ops(out) == ["Gemm", "Gemm"] and not reasons
    row = records[0].result.layers[0]
    assert row["rank"] == 8 and row["params_before"] == K * N and row["params_after"] == 8 * (K + N)
    assert records[0].result.counts == {LAYERS_FACTORIZED: 1, PARAMS_REMOVED: K * N - 8 * (K + N)}
    assert row["macs_before"] == 5 * K * N and row["macs_after"] == 5 * 8 * (K + N)  # m = 5 rows at batch 1
    w = initializer(model, "fc.weight").T.astype(np.float64)
    u, s, vt = np.linalg.svd(w)
    truncated = model.graph.initializer[0]
    truncated.CopyFrom(onnx.numpy_helper.from_array(((u[:, :8] * s[:8]) @ vt[:8]).T.astype(np.float32),
                                                    "fc.weight"))
    assert_same_outputs(model, out, rtol=1e-5)
    assert row["weight_error"] == pytest.approx(truncation_error(s, 8), rel=1e-4)


# -------------------------------------------------------------------------------------------- MatMul, Conv


def test_matmul_3d_activation():
    w = low_rank(K, N, 6, seed=4)
    model = make_model([node("MatMul", ["x", "W"], ["h"], name="proj"), node("Relu", ["h"], ["y"])],
                       [("x", ["batch", 3, 7, K])], ["y"], {"W": w})
    out, _ = full_rank(model)
    assert ops(out) == ["MatMul", "MatMul", "Relu"]
    assert_same_outputs(model, out, rtol=1e-5)
    out, records, reasons = svd(model, energy=0.999, align=1)
    assert ops(out) == ["MatMul", "MatMul", "Relu"] and not reasons
    row = records[0].result.layers[0]
    assert 6 <= row["rank"] <= 8 and row["macs_before"] == 21 * K * N  # 3*7 vectors per sample at batch 1
    assert {t.name for t in out.graph.initializer} == {"W_svd_a", "W_svd_b"}  # names derive from the old ones
    feeds = random_feeds(model)
    assert rel_error(run(model, feeds)[0], run(out, feeds)[0]) < 0.05


def conv_model(k=(1, 1), group=1, **conv_attrs):
    c_in, c_out = 32, 24
    w = low_rank(c_out, c_in // group, 4, seed=5).reshape(c_out, c_in // group, 1, 1)
    if k != (1, 1):
        w = rand(c_out, c_in // group, *k, seed=5)
    return make_model([node("Conv", ["x", "w", "b"], ["y"], name="pw", group=group, **conv_attrs)],
                      [("x", [2, c_in, 9, 7])], ["y"], {"w": w, "b": rand(c_out, seed=6)})


@pytest.mark.parametrize("conv_attrs", [{}, {"strides": [2, 2], "pads": [1, 0, 1, 2]}, {"auto_pad": "SAME_UPPER",
                                                                                          "strides": [2, 3]}])
def test_conv_1x1(conv_attrs):
    model = conv_model(**conv_attrs)
    out, layers = full_rank(model)
    assert ops(out) == ["Conv", "Conv"]
    first, second = out.graph.node
    assert list(second.input) == [first.output[0], "w_svd_b", "b"]  # bias on the second factor
    assert initializer(out, "w_svd_a").shape == (24, 32, 1, 1) and initializer(out, "w_svd_b").shape == (24, 24, 1, 1)
    assert not {"strides", "pads", "auto_pad"} & attrs(second).keys()
    assert_same_outputs(model, out, rtol=1e-5)
    out, records, reasons = svd(model, rank=4)
    assert ops(out) == ["Conv", "Conv"] and initializer(out, "w_svd_a").shape == (4, 32, 1, 1)


def test_conv_declines_kxk_with_conv_off_and_grouped():
    for model, why, conv in ((conv_model(k=(3, 3), pads=[1, 1, 1, 1]), "k x k Conv and conv=off", "off"),
                             (conv_model(group=2), "group=2 (need 1)", "auto")):
        out, _, reasons = svd(model, rank=2, conv=conv)
        assert ops(out) == ["Conv"] and reasons == [f"Conv 'pw': {why}"]


@pytest.mark.parametrize("case", ["gemm-transA", "matmul-3d", "conv"])
def test_reported_output_error_is_measured_on_the_calibration_data(case):
    """The calibration output error in the report, computed from XᵀX alone, equals ‖y − y'‖/‖y‖ measured in
    onnxruntime on the same data: the activation rows are read along the right axis for each op."""
    rng = np.random.default_rng(11)
    if case == "gemm-transA":
        model = make_model([node("Gemm", ["x", "w"], ["y"], name="fc", transA=1, transB=1)], [("x", [K, 6])],
                           ["y"], {"w": rand(N, K, seed=12)})
        shape = (K, 6)
    elif case == "matmul-3d":
        model = make_model([node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", [2, 3, K])], ["y"],
                           {"w": rand(K, N, seed=13)})
        shape = (2, 3, K)
    else:
        model = make_model([node("Conv", ["x", "w"], ["y"], name="fc")], [("x", [1, K, 3, 4])], ["y"],
                           {"w": rand(N, K, 1, 1, seed=14)})
        shape = (1, K, 3, 4)
    scale = rng.uniform(0.05, 2, K).reshape([-1 if d == K else 1 for d in shape])  # anisotropic features
    data = [{"x": (rng.standard_normal(shape) * scale + 0.3).astype(np.float32)} for _ in range(12)]
    errors = []
    for aware in (False, True):
        ctx = PassContext(original=model, calib=open_source(data, model))
        out, records = run_pipeline(model, [make_spec("svd", {"rank": 6, "min-size": 0, "data-aware": aware})], ctx)
        row = records[0].result.layers[0]
        ref = np.concatenate([run(model, d)[0] for d in data]).astype(np.float64)
        got = np.concatenate([run(out, d)[0] for d in data]).astype(np.float64)
        assert row["output_error"] == pytest.approx(np.linalg.norm(ref - got) / np.linalg.norm(ref), rel=1e-3)
        errors.append(row["output_error"])
    assert errors[1] < errors[0]


# --------------------------------------------------------------------------------------------------- declines


def two_layers(shared: bool = False, **inits):
    w = low_rank(K, K, 4, seed=7)
    init = {"W1": w, **({} if shared else {"W2": low_rank(K, K, 4, seed=8)}), **inits}
    return make_model([node("MatMul", ["x", "W1"], ["h"], name="l1"), node("Relu", ["h"], ["r"]),
                       node("MatMul", ["r", "W1" if shared else "W2"], ["y"], name="l2")],
                      [("x", [4, K])], ["y"], init)


def test_declines():
    # shared weight: both users declined, graph unchanged
    model = two_layers(shared=True)
    out, records, reasons = svd(model, rank=4)
    assert same_graph(model, out)
    assert reasons == ["MatMul 'l1': weight 'W1' is shared (1 other use)",
                       "MatMul 'l2': weight 'W1' is shared (1 other use)"]
    # a layer producing the graph output is fine; the output keeps its name
    out, records, reasons = svd(two_layers(), rank=4)
    assert ops(out) == ["MatMul", "MatMul", "Relu", "MatMul", "MatMul"] and out.graph.output[0].name == "y"
    # no MAC gain (rank 24 of 48x48 needs r < 24) -> declined with a layers row saying why
    out, records, reasons = svd(two_layers(), rank=24, exclude=("l2",))
    assert ops(out) == ["MatMul", "Relu", "MatMul"]
    assert reasons[0] == "MatMul 'l2': excluded by option"
    assert reasons[1] == "MatMul 'l1': rank 24 would not reduce MACs (a 48x48 weight needs rank < 24.0)"
    assert records[0].result.layers == [{**records[0].result.layers[0], "layer": "l1", "rank": 24,
                                         "params_after": K * K, "status": "declined: " + reasons[1][13:]}]
    assert records[0].result.notes[1].startswith("hint: trained weights have flat spectra; data-aware=true")
    # min-reduction: rank 22 cuts 8%; min-size
    _, _, reasons = svd(two_layers(), rank=22, exclude=("MatMul",))
    assert reasons == ["MatMul 'l1': excluded by option", "MatMul 'l2': excluded by option"]
    _, _, reasons = svd(two_layers(), rank=22, exclude=("l2",))
    assert reasons[1] == ("MatMul 'l1': rank 22 cuts MACs by only 8.3% < min-reduction 10% (needs rank <= 21)")
    out, _, reasons = svd(two_layers(), rank=4, **{"min-size": K * K + 1})
    assert same_graph(two_layers(), out) and reasons[0] == "MatMul 'l1': 2304 weight parameters < min-size 2305"


def test_declines_non_constant_weights():
    # activation x activation (attention scores), a weight fed as a graph input, a Constant-node weight
    w = low_rank(K, N, 4)
    model = make_model([node("MatMul", ["x", "x_t"], ["s"], name="scores"), node("MatMul", ["s", "wi"], ["a"],
                                                                                   name="by_input"),
                        node("Constant", [], ["wc"], value=onnx.numpy_helper.from_array(w)),
                        node("MatMul", ["x", "wc"], ["y"], name="by_constant_node")],
                       [("x", [4, K]), ("x_t", [K, 4]), ("wi", [4, 4])], ["a", "y"])
    out, _, reasons = svd(model, rank=2)
    assert same_graph(model, out)
    assert [r.split(":")[0] for r in reasons] == ["MatMul 'scores'", "MatMul 'by_input'", "MatMul 'by_constant_node'"]
    assert all("weight is not a constant" in r for r in reasons)
    # after fold-constants the Constant-node weight is an initializer and is factorized
    out, _ = run_passes(model, ["fold-constants", ("svd", {"rank": 2, "min-size": 0})])
    assert ops(out).count("MatMul") == 4


@pytest.mark.parametrize("opts", [{"rank": 4}, {"ratio": 0.3}, {"energy": 0.95, "align": 1}, {}])
def test_idempotent(opts):
    """A factor pair is recognized: a second run changes nothing (even where half of a pair would still 'pay')."""
    once, _, _ = svd(two_layers(), **opts)
    assert ops(once).count("MatMul") == 4
    twice, records, reasons = svd(once, **opts)
    assert same_graph(once, twice) and not records[0].result.changed
    assert reasons and all("already a low-rank pair (48->" in r for r in reasons)


def test_options_usage_errors(cli, tmp_path):
    with pytest.raises(UsageError, match="at most one of rank, ratio, energy, max-error"):
        make_spec("svd", {"rank": "4", "energy": "0.9"})
    p = tmp_path / "in.onnx"
    onnx.save(two_layers(), p)
    assert_one_line_error(cli(p, tmp_path / "o.onnx", "--pass", "svd:ratio=0.5,max-error=0.1"), 2,
                          "at most one of rank, ratio, energy, max-error (got ratio, max-error)")
    assert_one_line_error(cli(p, tmp_path / "o.onnx", "--pass", "svd:data-aware=true"), 2,
                          "needs calibration data")
    assert SVD(SVD.Options(data_aware=True)).needs_calibration() and not SVD(SVD.Options()).needs_calibration()


# ------------------------------------------------------------------------------------------------------- math


# entries on a 0.01 grid in [-4, 4]: tiny values would make σ² underflow where ‖W‖ (scaled by numpy) does not
matrices = st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda kn: arrays(np.float64, kn, elements=st.integers(-400, 400).map(lambda i: i / 100)))


@settings(max_examples=150, deadline=None)
@given(matrices, st.integers(0, 9))
def test_weight_error_is_the_discarded_singular_values(w, r):
    r = min(r, min(w.shape))
    sigma = np.linalg.svd(w, compute_uv=False)
    a, b = decompose(w).factors(r)
    assert a.shape == (w.shape[0], r) and b.shape == (r, w.shape[1])
    norm = np.linalg.norm(w)
    expected = np.sqrt(np.sum(sigma[r:] ** 2)) / norm if norm > 0 else 0.0
    assert truncation_error(sigma, r) == pytest.approx(expected, abs=1e-9)
    if norm > 0:
        assert np.linalg.norm(w - a @ b) / norm == pytest.approx(expected, abs=1e-7)
        # the smallest rank meeting a max-error target meets it, one less does not
        target = expected + 1e-6
        q = rank_for_error(sigma, target)
        assert truncation_error(sigma, q) <= target + 1e-9 and (q <= 1 or truncation_error(sigma, q - 1) > target)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.integers(1, 7), st.integers(0, 2 ** 31))
def test_data_aware_is_optimal_for_the_output_error(k, n, r, seed):
    """Without damping, data-aware's output error on X is never above plain SVD's at the same rank."""
    r = min(r, k, n)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, k)) * rng.uniform(0.01, 3, k) + rng.standard_normal(k)
    w = rng.standard_normal((k, n))
    m = x.T @ x / len(x)
    plain = np.matmul(*decompose(w).factors(r))
    aware = np.matmul(*decompose(w, m, damping=0.0).factors(r))
    direct = np.linalg.norm(x @ (w - aware)) / np.linalg.norm(x @ w)
    assert relative_output_error(w, aware, m) == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert relative_output_error(w, aware, m) <= relative_output_error(w, plain, m) + 1e-9


def test_second_moment_streams():
    x = rand(6, 5, 3, 4, seed=9)
    once, pieces = SecondMoment(5, 1), SecondMoment(5, 1)
    once.update(x)
    for part in np.split(x, 3):
        pieces.update(part)
    rows = np.moveaxis(x, 1, -1).reshape(-1, 5).astype(np.float64)
    # float32 products per batch, float64 sums across batches
    np.testing.assert_allclose(once.matrix(), rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pieces.matrix(), once.matrix(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- real models


MLP = MODELS / "mnist_mlp.onnx"
needs_mnist = pytest.mark.skipif(not (MLP.exists() and (MODELS / "mnist_calib.npz").exists()),
                                 reason="models/mnist_mlp.onnx not built")


@needs_mnist
def test_cli_mnist_mlp(cli, tmp_path):
    """The real MLP through the CLI: data-aware at the default energy cuts its MACs by > 80% and keeps accuracy."""
    out, rep = tmp_path / "mlp_svd.onnx", tmp_path / "report.json"
    res = cli(MLP, out, "--pass", "svd:data-aware=true", "--calib-data", MODELS / "mnist_calib.npz", "--val-data",
              MODELS / "mnist_eval.npz", "--min-top1", "0.95", "--latency-runs", "0", "--report", rep)
    assert res.code == 0, res.err
    assert "accuracy on labels (1000 samples)" in res.out and "784x512 -> rank" in res.out
    report = json.loads(rep.read_text())
    layers = {row["shape"]: row for row in report["passes"][0]["layers"]}
    assert layers["784x512"]["status"] == layers["512x256"]["status"] == "factorized"
    counts = report["passes"][0]["counts"]
    assert counts[LAYERS_FACTORIZED] == 2 and counts[CALIBRATION_SAMPLES] > 0
    assert counts[PARAMS_REMOVED] == sum(layers[s]["params_before"] - layers[s]["params_after"]
                                         for s in ("784x512", "512x256"))
    assert all(0 < layers[s]["output_error"] < 0.15 for s in ("784x512", "512x256"))
    assert report["passes"][0]["declined"] == [{"site": "Gemm '/net/net.5/Gemm'",
                                                "reason": "2560 weight parameters < min-size 4096"}]
    assert report["after"]["macs"] < 0.2 * report["before"]["macs"]
    v = report["validation"]
    assert v["accuracy_after"] >= v["accuracy_before"] - 0.01, v
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("Gemm") == 5


@needs_mnist
def test_data_aware_beats_plain_on_mnist():
    """Same ranks; data-aware has lower per-layer output error on the calibration data and lower logit error and
    no worse accuracy on held-out evaluation data."""
    model = onnx.load(MLP)
    z = np.load(MODELS / "mnist_eval.npz")
    x, labels = z["input"][:500], z["__labels__"][:500]
    ref = run(model, {"input": x})[0]
    results = {}
    for aware in (False, True):
        ctx = PassContext(original=model, calib=open_source(MODELS / "mnist_calib.npz", model, max_samples=256))
        out, records = run_pipeline(model, [make_spec("svd", {"rank": 32, "data-aware": aware})], ctx)
        layers = [r["output_error"] for r in records[0].result.layers if r["status"] == "factorized"]
        y = run(out, {"input": x})[0]
        results[aware] = (layers, np.linalg.norm(y - ref) / np.linalg.norm(ref), np.mean(y.argmax(1) == labels))
    (plain, plain_err, plain_acc), (aware, aware_err, aware_acc) = results[False], results[True]
    assert len(plain) == len(aware) == 2
    assert all(a < p for a, p in zip(aware, plain)), (aware, plain)
    assert aware_err < 0.7 * plain_err and aware_acc >= plain_acc, (aware_err, plain_err, aware_acc, plain_acc)


def test_idempotent_gemm_below_opset_11():
    """The first factor's zero C (needed below opset 11) does not hide the factor pair from a second run."""
    once, _, _ = svd(gemm_model(0, 1, 1.0, 1.0, "vector", opset=10), ratio=0.3)
    twice, records, reasons = svd(once, ratio=0.3)
    assert ops(once) == ["Gemm", "Gemm"] and same_graph(once, twice) and len(reasons) == 2


def test_rank_auto_factorizes_as_far_as_the_targets_allow(cli, tmp_path):
    """rank=auto: the largest data-aware output error bound whose model keeps the pipeline's targets (judged on
    calibration samples its statistics did not see, with the margins), each layer at the smallest rank within it."""
    out, rep = tmp_path / "auto.onnx", tmp_path / "r.json"
    res = cli(MODELS / "mnist_mlp.onnx", out, "--pass", "svd:rank=auto", "--calib-data", MODELS / "mnist_calib.npz",
              "--val-data", MODELS / "mnist_eval.npz", "--report", rep, "--latency-runs", "0")
    assert res.code == 0, res.err
    report = json.loads(rep.read_text())
    step = report["passes"][-1]
    assert step["counts"][LAYERS_FACTORIZED] >= 1 and report["after"]["macs"] < 0.5 * report["before"]["macs"]
    note = next(n for n in step["notes"] if n.startswith("rank=auto:"))
    chosen = float(re.search(r"max-error=([\d.]+)", note).group(1))
    tried = {float(e): v for e, v in re.findall(r"(\d\.\d+): cosine [^;]*? (meets|misses)", note)}
    assert tried[chosen] == "meets" and all(v == "misses" for e, v in tried.items() if e > chosen)
    assert report["validation"]["passed"]


def test_rank_auto_needs_data_and_targets(cli, tmp_path, model_path):
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--pass", "svd:rank=auto"), 2, "needs calibration data")
    data = tmp_path / "c.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "svd:rank=auto", "--calib-data", data, "--no-gate",
              "--latency-runs", "0")
    assert res.code == 0 and "rank=auto: the pipeline has no target to search against" in res.out, res.err
