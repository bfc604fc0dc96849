"""fold-bn: BatchNormalization and per-channel constant Mul/Add folded into Conv, ConvTranspose, Gemm, MatMul.

Each test builds its graph, runs the pass through the real pipeline (cleanup, toposort, onnx.checker after the
pass) and checks the op list, the numbers in onnxruntime with graph optimizations off, and the decline reasons.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.io import load_model
from graphopt.graph import import_graph
from graphopt.passes.base import PassContext
from graphopt.passes.fold_bn import FoldBatchNorm, folded_key
from graphs import (assert_same_outputs, attrs, declined, initializer, make_model, node, node_by_op, ops, rand,
                    run_passes, same_graph)


def bn_params(prefix: str, c: int, seed: int = 1) -> dict[str, np.ndarray]:
    """gamma, beta, mean, var for ``c`` channels; var in [0.05, 2), gamma of both signs."""
    return {f"{prefix}.gamma": rand(c, seed=seed, lo=-2, hi=2), f"{prefix}.beta": rand(c, seed=seed + 1),
            f"{prefix}.mean": rand(c, seed=seed + 2), f"{prefix}.var": rand(c, seed=seed + 3, lo=0.05, hi=2)}


def bn(x: str, y: str, prefix: str = "bn", **kw) -> onnx.NodeProto:
    return node("BatchNormalization", [x, f"{prefix}.gamma", f"{prefix}.beta", f"{prefix}.mean", f"{prefix}.var"],
                [y], name=prefix, **kw)


def fold(model: onnx.ModelProto, passes=("fold-bn",)):
    """Run the passes; check the result is idempotent (a second run changes nothing) and return (model, reasons)."""
    out, records = run_passes(model, list(passes))
    again, records2 = run_passes(out, list(passes))
    assert same_graph(out, again), "second run changed the graph"
    assert not any(r.result.changed for r in records2)
    return out, declined(records)


def conv_bn_model(*, c_in=4, c_out=6, group=1, bias=True, eps=1e-5, k=3, spatial=2, relu=False, **conv_attrs):
    w = rand(c_out, c_in // group, *[k] * spatial, seed=3)
    inits = {"conv1.weight": w, **bn_params("bn", c_out)}
    inputs = ["x", "conv1.weight"]
    if bias:
        inits["conv1.bias"] = rand(c_out, seed=4)
        inputs.append("conv1.bias")
    nodes = [node("Conv", inputs, ["c"], name="conv1", group=group, **conv_attrs), bn("c", "b", epsilon=eps)]
    if relu:
        nodes.append(node("Relu", ["b"], ["y"]))
    return make_model(nodes, [("x", [2, c_in] + [9] * spatial)], ["y" if relu else "b"], inits)


# ------------------------------------------------------------------------------------------------------ fires


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds(eps, bias):
    model = conv_bn_model(eps=eps, bias=bias, pads=[1, 1, 1, 1])
    out, reasons = fold(model)
    assert ops(out) == ["Conv"] and reasons == []
    assert out.graph.output[0].name == "b"                  # the BN's output name is kept
    conv = node_by_op(out, "Conv")
    assert list(conv.input) == ["x", "conv1.weight_fold", "conv1.bias_fold"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("group,c_in,c_out", [(2, 4, 6), (4, 4, 4), (3, 3, 6)], ids=["grouped", "depthwise",
                                                                                     "depthwise-x2"])
def test_grouped_and_depthwise_conv(group, c_in, c_out):
    model = conv_bn_model(group=group, c_in=c_in, c_out=c_out, strides=[2, 2])
    out, _ = fold(model)
    assert ops(out) == ["Conv"]
    assert attrs(node_by_op(out, "Conv"))["group"] == group
    assert_same_outputs(model, out)


@pytest.mark.parametrize("spatial", [1, 3])
def test_conv1d_and_conv3d(spatial):
    model = conv_bn_model(spatial=spatial, k=2, bias=False)
    out, _ = fold(model)
    assert ops(out) == ["Conv"]
    assert_same_outputs(model, out)


def test_conv_bn_relu_keeps_relu():
    model = conv_bn_model(relu=True)
    out, _ = fold(model)
    assert ops(out) == ["Conv", "Relu"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("group,c_in,c_out_per_group", [(1, 4, 3), (2, 4, 3), (3, 6, 1), (2, 2, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose(group, c_in, c_out_per_group, bias):
    c_out = group * c_out_per_group
    inits = {"up.weight": rand(c_in, c_out_per_group, 3, 3, seed=5), **bn_params("bn", c_out)}
    inputs = ["x", "up.weight"]
    if bias:
        inits["up.bias"] = rand(c_out, seed=6)
        inputs.append("up.bias")
    model = make_model([node("ConvTranspose", inputs, ["c"], group=group, strides=[2, 2]), bn("c", "y")],
                       [("x", [1, c_in, 5, 5])], ["y"], inits)
    out, _ = fold(model)
    assert ops(out) == ["ConvTranspose"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [5], [1, 5], [3, 5], []], ids=["noC", "C[N]", "C[1,N]", "C[M,N]",
                                                                          "C-scalar"])
def test_gemm(trans_b, c_shape):
    w = rand(5, 7, seed=7) if trans_b else rand(7, 5, seed=7)
    inits = {"fc.weight": w, **bn_params("bn", 5)}
    inputs = ["x", "fc.weight"]
    if c_shape is not None:
        inits["fc.bias"] = rand(*c_shape, seed=8)
        inputs.append("fc.bias")
    model = make_model([node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.5, beta=1.5), bn("g", "y")],
                       [("x", [3, 7])], ["y"], inits)
    out, _ = fold(model)
    assert ops(out) == ["Gemm"]
    a = attrs(node_by_op(out, "Gemm"))
    assert a["transB"] == trans_b and a["alpha"] == 0.5 and a["beta"] == 1.0
    assert_same_outputs(model, out)


def test_matmul_constant_weight_becomes_gemm():
    inits = {"fc.weight": rand(7, 5, seed=9), **bn_params("bn", 5)}
    model = make_model([node("MatMul", ["x", "fc.weight"], ["m"], name="fc"), bn("m", "y")],
                       [("x", ["batch", 7])], ["y"], inits)
    out, _ = fold(model)
    assert ops(out) == ["Gemm"]
    assert run_passes(model, ["fold-bn"])[1][-1].result.counts == {folded_key("BatchNormalization", "MatMul"): 1}
    gemm = node_by_op(out, "Gemm")
    assert gemm.name == "fc" and list(gemm.input) == ["x", "fc.weight_fold", "fc.bias_fold"]
    assert_same_outputs(model, out)


def test_mul_add_after_conv():
    """Scalar, [C,1,1], [1,C,1,1] and [1] constants, both operand orders; chained folds reach a fixed point."""
    c = 4
    inits = {"w": rand(c, 3, 3, 3), "s1": np.float32(1.5), "s2": rand(c, 1, 1, seed=2),
             "a1": rand(1, c, 1, 1, seed=3), "a2": rand(1, seed=4), **bn_params("bn", c)}
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Mul", ["c", "s1"], ["m1"]),
                        node("Mul", ["s2", "m1"], ["m2"]), node("Add", ["m2", "a1"], ["a"]),
                        bn("a", "b"), node("Add", ["a2", "b"], ["y"])],
                       [("x", [1, 3, 8, 8])], ["y"], inits)
    out, reasons = fold(model)
    assert ops(out) == ["Conv"] and reasons == []
    assert_same_outputs(model, out)
    counts = run_passes(model, ["fold-bn"])[1][-1].result.counts
    assert counts == {folded_key("Mul", "Conv"): 2, folded_key("Add", "Conv"): 2,
                      folded_key("BatchNormalization", "Conv"): 1}


@pytest.mark.parametrize("first", ["MatMul", "Gemm", "Gemm-transB"])
def test_bias_add_and_mul_after_rank2_matmul_gemm(first):
    """Keras/TF exports write a dense layer as MatMul + Add(bias): the Add (and a per-column Mul) fold into a Gemm."""
    w = rand(5, 7, seed=9) if first == "Gemm-transB" else rand(7, 5, seed=9)
    inits = {"fc.weight": w, "fc.c": rand(5, seed=3), "s": rand(1, 5, seed=4), "b": rand(5, seed=5)}
    head = (node("MatMul", ["x", "fc.weight"], ["m"], name="fc") if first == "MatMul" else
            node("Gemm", ["x", "fc.weight", "fc.c"], ["m"], name="fc", beta=0.5, transB=int(first != "Gemm")))
    model = make_model([head, node("Mul", ["m", "s"], ["ms"]), node("Add", ["b", "ms"], ["a"]),
                        node("Relu", ["a"], ["y"])], [("x", ["batch", 7])], ["y"], inits,
                       value_infos=[("m", ["batch", 5]), ("ms", ["batch", 5]), ("a", ["batch", 5])])
    out, reasons = fold(model)
    assert ops(out) == ["Gemm", "Relu"] and reasons == []
    assert_same_outputs(model, out)


def test_rank3_matmul_add_is_not_a_site():
    """A transformer's [B, S, K] @ [K, N] + bias: no Gemm takes it, and it is not reported as declined either."""
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["y"])], [("x", [2, 3, 7])],
                       ["y"], {"w": rand(7, 5), "b": rand(5)}, value_infos=[("m", [2, 3, 5])])
    out, reasons = fold(model)
    assert ops(out) == ["MatMul", "Add"] and reasons == []


def test_decline_add_per_row_after_matmul():
    model = make_model([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["y"])], [("x", [4, 7])],
                       ["y"], {"w": rand(7, 5), "b": rand(4, 1)}, value_infos=[("m", [4, 5])])
    assert_declined(model, "is not a scalar or per-channel")


def test_bn_after_mul_folds_on_second_sweep():
    """Conv -> Mul -> BN: BN's producer is a Mul until the Mul is folded; no decline is left over."""
    inits = {"w": rand(4, 3, 1, 1), "s": rand(1, 4, 1, 1, seed=2), **bn_params("bn", 4)}
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Mul", ["c", "s"], ["m"]), bn("m", "y")],
                       [("x", [1, 3, 4, 4])], ["y"], inits)
    out, reasons = fold(model)
    assert ops(out) == ["Conv"] and reasons == []
    assert_same_outputs(model, out)


def test_add_folds_even_with_shared_weight():
    """An Add only changes the bias: a weight shared with another Conv stays as it is."""
    inits = {"w": rand(4, 3, 3, 3), "k": rand(4, 1, 1, seed=5)}
    model = make_model([node("Conv", ["x", "w"], ["c1"]), node("Add", ["c1", "k"], ["y1"]),
                        node("Conv", ["x", "w"], ["y2"])], [("x", [1, 3, 6, 6])], ["y1", "y2"], inits)
    out, _ = fold(model)
    assert ops(out) == ["Conv", "Conv"]
    assert [n.input[1] for n in out.graph.node] == ["w", "w"]
    assert_same_outputs(model, out)


def test_constant_node_weights_fold_after_the_prerequisite():
    """Exported models keep weights in Constant nodes: fold-bn declares fold-constants its prerequisite, so the
    pipeline lowers them first, then folds; the pass on its own declines such a site, with the reason."""
    w = onnx.numpy_helper.from_array(rand(4, 3, 3, 3), "wc")
    model = make_model([node("Constant", [], ["w"], value=w), node("Conv", ["x", "w"], ["c"]), bn("c", "y")],
                       [("x", [1, 3, 6, 6])], ["y"], bn_params("bn", 4))
    out, records = run_passes(model, ["fold-bn"])
    assert [r.spec for r in records] == ["fold-constants", "fold-bn"]
    assert ops(out) == ["Conv"]
    assert_same_outputs(model, out)
    alone = FoldBatchNorm(FoldBatchNorm.Options()).run(import_graph(model), PassContext(original=model))
    assert not alone.changed and any("not an initializer" in d["reason"] for d in alone.declined)


def test_folded_values_in_float64():
    """W' = W·γ/√(σ²+ε) and b' = (b−μ)·γ/√(σ²+ε)+β computed in float64, then cast to float32."""
    model = conv_bn_model(eps=1e-3)
    out, _ = fold(model)
    i = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    s = i["bn.gamma"] / np.sqrt(i["bn.var"] + float(np.float32(1e-3)))
    np.testing.assert_array_equal(initializer(out, "conv1.weight_fold"),
                                  (i["conv1.weight"] * s[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(initializer(out, "conv1.bias_fold"),
                                  ((i["conv1.bias"] - i["bn.mean"]) * s + i["bn.beta"]).astype(np.float32))


def test_mul_add_option_off():
    inits = {"w": rand(4, 3, 3, 3), "k": rand(4, 1, 1, seed=5)}
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Add", ["c", "k"], ["y"])],
                       [("x", [1, 3, 6, 6])], ["y"], inits)
    out, _ = fold(model, passes=(("fold-bn", {"mul-add": "false"}),))
    assert ops(out) == ["Conv", "Add"]


# ----------------------------------------------------------------------------------------------------- declines


def assert_declined(model, *needles, passes=("fold-bn",)):
    out, reasons = fold(model, passes)
    assert sorted(ops(out)) == sorted(ops(model))       # the pipeline may have reordered (toposort)
    assert same_graph(out, run_passes(model, [])[0]), "a declined site changed the graph"
    for needle in needles:
        assert any(needle in r for r in reasons), (needle, reasons)
    return reasons


def test_decline_conv_with_two_consumers():
    model = make_model([node("Conv", ["x", "w"], ["c"], name="conv1"), bn("c", "b"),
                        node("Relu", ["c"], ["r"])], [("x", [1, 3, 6, 6])], ["b", "r"],
                       {"w": rand(4, 3, 3, 3), **bn_params("bn", 4)})
    reasons = assert_declined(model, "has 2 consumers")
    assert reasons == ["BatchNormalization 'bn': the output 'c' of Conv 'conv1' has 2 consumers"]


def test_decline_conv_output_is_graph_output():
    model = make_model([node("Conv", ["x", "w"], ["c"]), bn("c", "b")], [("x", [1, 3, 6, 6])], ["b", "c"],
                       {"w": rand(4, 3, 3, 3), **bn_params("bn", 4)})
    assert_declined(model, "is a graph output")


def test_decline_shared_weight():
    model = make_model([node("Conv", ["x", "w"], ["c1"]), bn("c1", "y1", "bn1"), node("Conv", ["x", "w"], ["c2"]),
                        bn("c2", "y2", "bn2")], [("x", [1, 3, 6, 6])], ["y1", "y2"],
                       {"w": rand(4, 3, 3, 3), **bn_params("bn1", 4), **bn_params("bn2", 4, seed=9)})
    reasons = assert_declined(model, "weight 'w' is shared")
    assert len(reasons) == 2


def test_decline_weight_not_initializer():
    model = make_model([node("Conv", ["x", "w"], ["c"]), bn("c", "y")], [("x", [1, 3, 6, 6]), ("w", [4, 3, 3, 3])],
                       ["y"], bn_params("bn", 4))
    assert_declined(model, "weight 'w' is not an initializer")


@pytest.mark.parametrize("which", ["gamma", "beta", "mean", "var"])
def test_decline_bn_parameter_not_constant(which):
    params = bn_params("bn", 4)
    del params[f"bn.{which}"]
    model = make_model([node("Conv", ["x", "w"], ["c"]), bn("c", "y")],
                       [("x", [1, 3, 6, 6]), (f"bn.{which}", [4])], ["y"], {"w": rand(4, 3, 3, 3), **params})
    assert_declined(model, f"'bn.{which}' is not a constant")


def test_decline_training_mode():
    p = ["bn.gamma", "bn.beta", "bn.mean", "bn.var"]
    model = make_model([node("Conv", ["x", "w"], ["c"]),
                        node("BatchNormalization", ["c", *p], ["y", "rm", "rv"], training_mode=1)],
                       [("x", [1, 3, 6, 6])], ["y", "rm", "rv"], {"w": rand(4, 3, 3, 3), **bn_params("bn", 4)})
    assert_declined(model, "training-mode")


def test_decline_spatial0_old_opset():
    p = ["bn.gamma", "bn.beta", "bn.mean", "bn.var"]
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("BatchNormalization", ["c", *p], ["y"], spatial=0)],
                       [("x", [1, 3, 6, 6])], ["y"], {"w": rand(4, 3, 3, 3), **bn_params("bn", 4)}, opset=8)
    assert_declined(model, "spatial=0")


def test_decline_matmul_rank3():
    """[B, S, K] @ [K, N]: BN's channel axis 1 is S, not the weight's N."""
    model = make_model([node("MatMul", ["x", "w"], ["m"]), bn("m", "y")], [("x", [2, 5, 7])], ["y"],
                       {"w": rand(7, 5), **bn_params("bn", 5)})
    assert_declined(model, "output rank is 3")


def test_decline_bn_after_other_op():
    model = make_model([node("Relu", ["x"], ["r"]), bn("r", "y")], [("x", [1, 4, 3, 3])], ["y"],
                       bn_params("bn", 4))
    assert_declined(model, "comes from Relu 'r'")


def test_decline_mul_not_per_channel():
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Mul", ["c", "k"], ["m"]),
                        node("Add", ["m", "k2"], ["y"])], [("x", [1, 3, 6, 6])], ["y"],
                       {"w": rand(4, 3, 3, 3), "k": rand(1, 1, 4, 4), "k2": rand(1, 1, 1, 4, 4)})
    assert_declined(model, "is not a scalar or per-channel")


def test_decline_add_broadcasting_rank():
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Add", ["c", "k"], ["y"])],
                       [("x", [1, 3, 6])], ["y"], {"w": rand(4, 3, 3), "k": rand(1, 4, 1, 1)})
    assert_declined(model, "would broadcast the rank-3 output")


def test_unrelated_mul_add_are_not_sites():
    """A Mul/Add that does not follow a Conv is not a candidate: no decline noise."""
    model = make_model([node("Relu", ["x"], ["r"]), node("Add", ["r", "k"], ["y"])], [("x", [1, 4, 3, 3])], ["y"],
                       {"k": rand(1)})
    out, reasons = fold(model)
    assert ops(out) == ["Relu", "Add"] and reasons == []


# ------------------------------------------------------------------------------------------ property (hypothesis)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(["Conv", "ConvTranspose"]), group=st.integers(1, 3), cin_g=st.integers(1, 3),
       cout_g=st.integers(1, 3), eps=st.sampled_from([1e-5, 1e-3, 0.1]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_fold_matches_bn(op, group, cin_g, cout_g, eps, bias, seed):
    c_in, c_out = group * cin_g, group * cout_g
    shape = [c_out, cin_g, 2, 2] if op == "Conv" else [c_in, cout_g, 2, 2]
    inits = {"w": rand(*shape, seed=seed), **bn_params("bn", c_out, seed=seed + 1)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rand(c_out, seed=seed + 7)
        inputs.append("b")
    model = make_model([node(op, inputs, ["c"], group=group), bn("c", "y", epsilon=eps)],
                       [("x", [1, c_in, 4, 4])], ["y"], inits)
    out, _ = run_passes(model, ["fold-bn"])
    assert ops(out) == [op]
    assert_same_outputs(model, out, seeds=(seed,))


# ---------------------------------------------------------------------------------------------- end to end


def test_optimize_default_pipeline():
    model = conv_bn_model(relu=True)
    out, report = graphopt.optimize(model, latency_runs=0)
    assert ops(out) == ["Conv", "Relu"]
    assert report.validation is not None and report.validation.passed
    assert [p["pass"] for p in report.passes] == ["fold-constants", "fold-bn"]
    assert report.passes[1]["counts"] == {folded_key("BatchNormalization", "Conv"): 1}


def test_cli_default_pipeline(cli, tmp_path):
    """In-process (the ``cli`` fixture): ``python -m graphopt`` as a process, default pipeline and exit 0 included,
    is run by tests/test_layers.py and tests/test_cli_errors.py."""
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(conv_bn_model(relu=True), src)
    res = cli(src, dst, "--latency-runs", "0")
    assert res.code == 0, res.err
    out = load_model(dst)
    assert "BatchNormalization" not in ops(out) and ops(out) == ["Conv", "Relu"]
    assert "PASSED" in res.out
