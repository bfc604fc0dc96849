"""fuse-conv-relu: Conv + activation -> com.microsoft.FusedConv (activation, activation_params).

Numbers are compared in onnxruntime with graph optimizations off, so the FusedConv kernel itself is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.errors import UsageError
from graphopt.pipeline import DEFAULT_PIPELINE, check_order, make_spec, registry
from graphopt.passes.base import Pass
from graphopt.passes.fuse_conv_relu import fused_key
from graphs import (MS_DOMAIN, assert_same_outputs, attrs, declined, make_model, node, node_by_op, ops, rand, run_passes, same_graph)

FUSED = f"{MS_DOMAIN}.FusedConv"
F32_MAX = float(np.finfo(np.float32).max)     # a missing Clip bound, as onnxruntime's Clip kernel uses it


def conv_act_model(act: onnx.NodeProto, extra_inits=None, *, opset=17, bias=True, extra_inputs=(), **conv_attrs):
    inits = {"conv.weight": rand(6, 4 // conv_attrs.get("group", 1), 3, 3, seed=1, lo=-2, hi=2),
             **(extra_inits or {})}
    inputs = ["x", "conv.weight"]
    if bias:
        inits["conv.bias"] = rand(6, seed=2)
        inputs.append("conv.bias")
    return make_model([node("Conv", inputs, ["c"], name="conv", **conv_attrs), act],
                      [("x", [2, 4, 10, 10]), *extra_inputs], ["y"], inits, opset=opset)


def fuse(model, passes=("fuse-conv-relu",)):
    """Run the passes; check the result is idempotent and return (model, decline reasons)."""
    out, records = run_passes(model, list(passes))
    again, records2 = run_passes(out, list(passes))
    assert same_graph(out, again) and not any(r.result.changed for r in records2)
    return out, declined(records)


CASES = {
    "relu": (node("Relu", ["c"], ["y"]), {}, 17, "Relu", None),
    "sigmoid": (node("Sigmoid", ["c"], ["y"]), {}, 17, "Sigmoid", None),
    "tanh": (node("Tanh", ["c"], ["y"]), {}, 17, "Tanh", None),
    "leaky-default": (node("LeakyRelu", ["c"], ["y"]), {}, 17, "LeakyRelu", [0.01]),
    "leaky": (node("LeakyRelu", ["c"], ["y"], alpha=0.2), {}, 17, "LeakyRelu", [0.2]),
    "hardsigmoid": (node("HardSigmoid", ["c"], ["y"], alpha=0.3, beta=0.4), {}, 17, "HardSigmoid", [0.3, 0.4]),
    "hardsigmoid-default": (node("HardSigmoid", ["c"], ["y"]), {}, 17, "HardSigmoid", [0.2, 0.5]),
    "relu6": (node("Clip", ["c", "lo", "hi"], ["y"]), {"lo": np.float32(0), "hi": np.float32(6)}, 17, "Clip",
              [0.0, 6.0]),
    "clip-min-only": (node("Clip", ["c", "lo"], ["y"]), {"lo": np.float32(-0.5)}, 17, "Clip", [-0.5, F32_MAX]),
    "clip-max-only": (node("Clip", ["c", "", "hi"], ["y"]), {"hi": np.float32(0.5)}, 17, "Clip", [-F32_MAX, 0.5]),
    "clip-opset6-attrs": (node("Clip", ["c"], ["y"], min=0.0, max=6.0), {}, 6, "Clip", [0.0, 6.0]),
    "clip-opset6-default-min": (node("Clip", ["c"], ["y"], max=1.0), {}, 6, "Clip", [-F32_MAX, 1.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fuses(case):
    act, inits, opset, activation, params = CASES[case]
    model = conv_act_model(act, inits, opset=opset, pads=[1, 1, 1, 1])
    out, reasons = fuse(model)
    assert ops(out) == [FUSED] and reasons == []
    assert run_passes(model, ["fuse-conv-relu"])[1][0].result.counts == {fused_key(activation): 1}
    fused = node_by_op(out, "FusedConv")
    a = attrs(fused)
    assert a["activation"].decode() == activation
    if params is None:
        assert "activation_params" not in a
    else:
        np.testing.assert_allclose(a["activation_params"], params, rtol=1e-7)
    assert a["pads"] == [1, 1, 1, 1]
    assert list(fused.input) == ["x", "conv.weight", "conv.bias"] and list(fused.output) == ["y"]
    assert any(o.domain == MS_DOMAIN and o.version == 1 for o in out.opset_import)
    assert_same_outputs(model, out, rtol=1e-6)


@pytest.mark.parametrize("conv_attrs", [dict(group=2, strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 1]),
                                        dict(group=2, strides=[2, 2], auto_pad="SAME_UPPER")],
                         ids=["grouped-strided-dilated", "grouped-same-upper"])
def test_conv_attributes_kept_no_bias(conv_attrs):
    model = conv_act_model(node("Relu", ["c"], ["y"]), bias=False, **conv_attrs)
    out, _ = fuse(model)
    assert ops(out) == [FUSED]
    fused = node_by_op(out, "FusedConv")
    assert list(fused.input) == ["x", "conv.weight"]
    a = attrs(fused)
    assert {k: a[k] for k in conv_attrs} == {k: v.encode() if isinstance(v, str) else v for k, v in conv_attrs.items()}
    assert_same_outputs(model, out, rtol=1e-6)


def test_after_fold_bn():
    """The practical pipeline: Conv-BN-ReLU6 -> FusedConv(Clip) after fold-bn."""
    c = 6
    inits = {"gamma": rand(c, seed=3), "beta": rand(c, seed=4), "mean": rand(c, seed=5),
             "var": rand(c, seed=6, lo=0.1, hi=1), "lo": np.float32(0), "hi": np.float32(6)}
    model = make_model([node("Conv", ["x", "w"], ["c"]),
                        node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
                        node("Clip", ["b", "lo", "hi"], ["y"])], [("x", [1, 4, 8, 8])], ["y"],
                       {"w": rand(c, 4, 3, 3), **inits})
    out, _ = fuse(model, ("fold-bn", "fuse-conv-relu"))
    assert ops(out) == [FUSED]
    assert_same_outputs(model, out)
    out2, report = graphopt.optimize(model, ["fold-constants", "fold-bn", "fuse-conv-relu"], latency_runs=0)
    assert ops(out2) == [FUSED] and report.validation.passed


def test_chain_of_convs():
    inits = {"w1": rand(4, 4, 3, 3, seed=1), "w2": rand(4, 4, 1, 1, seed=2)}
    model = make_model([node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
                        node("Conv", ["r1", "w2"], ["c2"]), node("Sigmoid", ["c2"], ["y"])],
                       [("x", [1, 4, 6, 6])], ["y"], inits)
    out, _ = fuse(model)
    assert ops(out) == [FUSED, FUSED]
    assert_same_outputs(model, out, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------- declines


def assert_declined(model, needle):
    out, reasons = fuse(model)
    assert sorted(ops(out)) == sorted(ops(model))
    assert same_graph(out, run_passes(model, [])[0]), "a declined site changed the graph"
    assert any(needle in r for r in reasons), reasons
    return reasons


def test_decline_conv_with_two_consumers():
    model = make_model([node("Conv", ["x", "w"], ["c"], name="conv"), node("Relu", ["c"], ["y"]),
                        node("Sigmoid", ["c"], ["s"])], [("x", [1, 4, 6, 6])], ["y", "s"], {"w": rand(4, 4, 3, 3)})
    reasons = assert_declined(model, "has 2 consumers")
    assert len(reasons) == 2 and reasons[0].startswith("Conv 'conv' + ")


def test_decline_conv_output_is_graph_output():
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Relu", ["c"], ["y"])], [("x", [1, 4, 6, 6])],
                       ["y", "c"], {"w": rand(4, 4, 3, 3)})
    assert_declined(model, "'c' is a graph output")


def test_decline_clip_bound_not_constant():
    model = conv_act_model(node("Clip", ["c", "lo"], ["y"]), extra_inputs=[("lo", [])])
    assert_declined(model, "Clip min 'lo' is not a constant")


def test_decline_float16_conv():
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Relu", ["c"], ["y"])],
                       [("x", [1, 4, 6, 6], np.float16)], ["y"], {"w": rand(4, 4, 3, 3, dtype=np.float16)})
    assert_declined(model, "float32 only")


def test_other_activations_and_domains_are_not_sites():
    """Match on (domain, op): a Relu in another domain, or a Relu after a non-Conv, is left alone silently."""
    model = make_model([node("Conv", ["x", "w"], ["c"]), node("Relu", ["c"], ["y"], domain="custom.domain"),
                        node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2]), node("Relu", ["p"], ["z"])],
                       [("x", [1, 4, 6, 6])], [("y", [1, 4, 4, 4]), "z"], {"w": rand(4, 4, 3, 3)},
                       domains={"custom.domain": 1})
    out, reasons = fuse(model)
    assert sorted(ops(out)) == sorted(ops(model)) and reasons == []


# ------------------------------------------------------------------------------------------------ pipeline rules


def test_not_in_default_pipeline():
    assert "fuse-conv-relu" not in DEFAULT_PIPELINE
    assert "fuse-conv-relu" in registry()


def test_order_rule_refuses_quantize_after_fusion(monkeypatch):
    """The rule is declared by the later pass. A stand-in lossy pass carries the rule the real quantize pass is to
    declare; check_order must refuse fuse-conv-relu -> it, and allow the other order."""
    import graphopt.passes.base as base

    @dataclass(frozen=True)
    class _Opts:
        pass

    class FakeQuantize(Pass):
        name = "fake-quantize"
        summary = "stand-in"
        Options = _Opts
        exact = False
        must_not_follow = {"fuse-conv-relu": "onnxruntime's int8 fusions match plain Conv"}

    monkeypatch.setitem(base._REGISTRY, FakeQuantize.name, FakeQuantize)
    with pytest.raises(UsageError, match="'fake-quantize' cannot run after 'fuse-conv-relu'"):
        check_order([make_spec("fuse-conv-relu", {}), make_spec("fake-quantize", {})])
    check_order([make_spec("fake-quantize", {}), make_spec("fuse-conv-relu", {})])


def test_order_rule_real_quantize():
    if "quantize" not in registry():
        pytest.skip("pass 'quantize' is not registered yet; it must declare must_not_follow['fuse-conv-relu']")
    with pytest.raises(UsageError, match="'quantize' cannot run after 'fuse-conv-relu'"):
        check_order([make_spec("fuse-conv-relu", {}), make_spec("quantize", {})])
