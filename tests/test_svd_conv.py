"""svd on k×k Convs: spatial (kh×1 then 1×kw) and Tucker-2 (1×1, kh×kw, 1×1) factorization.

Exact at full rank in onnxruntime (optimizations off) for strides, asymmetric pads, dilations and auto_pad; the math
as hypothesis properties (spatial weight error = the discarded singular values; the data-aware last factor is the
least-squares optimum of the output error); declines with reasons and the graph untouched; idempotence; the
reported output error equals the one measured in onnxruntime; rank=auto factorizes convs under the targets.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.calibration.readers import open_source
from graphopt.passes.base import PassContext
from graphopt.passes.lowrank.conv import error_of, patch_matrix, spatial, spatial_svd, tucker
from graphopt.passes.lowrank.factor import truncation_error
from graphopt.pipeline import make_spec, run_pipeline
from test_svd import full_rank
from graphs import assert_same_outputs, attrs, declined, make_model, node, ops, rand, run, run_passes, same_graph

GEOMETRIES = [{}, {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]},
              {"auto_pad": "SAME_UPPER", "strides": [2, 3]}]


def conv(c_in: int = 8, c_out: int = 12, k: tuple[int, int] = (3, 3), group: int = 1, seed: int = 3, **conv_attrs):
    w = rand(c_out, c_in // group, *k, seed=seed)
    return make_model([node("Conv", ["x", "w", "b"], ["y"], name="c", group=group, **conv_attrs)],
                      [("x", [2, c_in, 11, 10])], ["y"], {"w": w, "b": rand(c_out, seed=seed + 1)})


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_spatial_full_rank_exact(geometry):
    model = conv(**geometry)
    out, layers = full_rank(model, conv="spatial")
    first, second = out.graph.node
    assert ops(out) == ["Conv", "Conv"] and list(second.input)[2:] == ["b"]
    assert attrs(first)["kernel_shape"] == [3, 1] and attrs(second)["kernel_shape"] == [1, 3]
    assert attrs(first).get("strides", [1, 1])[1] == 1 and attrs(second).get("strides", [1, 1])[0] == 1
    assert layers[0]["rank"] == "spatial 24" and layers[0]["weight_error"] < 1e-6   # min(8·3, 12·3)
    assert_same_outputs(model, out, rtol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tucker_full_ranks_exact(geometry):
    model = conv(**geometry)
    out, layers = full_rank(model, conv="tucker")
    assert ops(out) == ["Conv", "Conv", "Conv"]
    kernels = [attrs(n)["kernel_shape"] for n in out.graph.node]
    assert kernels == [[1, 1], [3, 3], [1, 1]] and list(out.graph.node[2].input)[2:] == ["b"]
    assert layers[0]["rank"] == "tucker 8x12"
    assert_same_outputs(model, out, rtol=1e-5)


def test_fires_where_it_pays_with_the_scheme_asked_for():
    model = conv(c_in=32, c_out=32)
    for scheme, golden, rank in (("spatial", ["Conv", "Conv"], "spatial 8"),
                                 ("tucker", ["Conv", "Conv", "Conv"], "tucker 8x8")):
        out, records = run_passes(model, [("svd", {"rank": 8, "min-size": 0, "conv": scheme})])
        row = records[0].result.layers[0]
        assert ops(out) == golden and row["rank"] == rank and row["status"] == "factorized"
        assert row["macs_after"] < 0.9 * row["macs_before"]
    out, records = run_passes(model, [("svd", {"rank": 8, "min-size": 0})])   # auto: the smaller error
    assert records[0].result.layers[0]["rank"] in ("spatial 8", "tucker 8x8")


def test_declines_and_leaves_the_graph_untouched():
    cases = [(conv(c_in=8, c_out=8, group=8, pads=[1, 1, 1, 1]), "depthwise Conv (group=8): only group 1"),
             (conv(c_in=8, c_out=8, group=2), "grouped Conv (group=2): only group 1"),
             (conv(c_in=32, c_out=32), "spatial rank 44 cuts MACs by only 8.3%"),        # 44·(96+96) vs 9216
             (conv(c_in=32, c_out=32), "k x k Conv and conv=off")]
    for i, (model, why) in enumerate(cases):
        out, records = run_passes(model, [("svd", {"rank": 44, "min-size": 0, "conv": "off" if i == 3 else
                                                   "spatial"})])
        reasons = declined(records)
        assert same_graph(model, out) and len(reasons) == 1 and why in reasons[0], reasons
    one_d = make_model([node("Conv", ["x", "w"], ["y"], name="c")], [("x", [1, 8, 20])], ["y"], {"w": rand(8, 8, 3)})
    out, records = run_passes(one_d, [("svd", {"rank": 1, "min-size": 0})])
    assert same_graph(one_d, out) and declined(records) == ["Conv 'c': 1-D Conv: only 2-D kernels are factorized"]


@pytest.mark.parametrize("scheme", ["spatial", "tucker"])
def test_idempotent(scheme):
    once, _ = run_passes(conv(c_in=32, c_out=32), [("svd", {"rank": 8, "min-size": 0, "conv": scheme})])
    twice, records = run_passes(once, [("svd", {"rank": 8, "min-size": 0, "conv": scheme})])
    reasons = declined(records)
    assert same_graph(once, twice) and not records[0].result.changed
    assert reasons and all(f"already a {scheme.capitalize() if scheme == 'tucker' else scheme}" in r
                           for r in reasons), reasons


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 3), st.integers(1, 12), st.integers(0, 10 ** 6))
def test_spatial_error_is_the_discarded_singular_values(c_in, c_out, k, r, seed):
    w = np.random.default_rng(seed).standard_normal((c_out, c_in, k, k))
    dec = spatial_svd(w)
    f = spatial(w, r, dec)
    composite = np.linalg.norm(patch_matrix(w) - f.approx)
    assert composite == pytest.approx(np.sqrt(np.sum(dec[1][r:] ** 2)), abs=1e-9)
    assert error_of(w, f, None) == pytest.approx(truncation_error(dec[1], r), abs=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(2, 4), st.integers(1, 3), st.integers(0, 10 ** 6))
def test_data_aware_last_factor_is_optimal(c_in, c_out, r, seed):
    """With the first factor(s) fixed, the refitted last factor's output error is below the plain one's and below
    any perturbation of it."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c_out, c_in, 3, 3))
    x = rng.standard_normal((200, c_in * 9)) * rng.uniform(0.1, 3, c_in * 9)
    m = x.T @ x / 200
    plain, aware = spatial(w, r), spatial(w, r, moment=m, damping=0.0)
    v, h = aware.kernels[0][..., 0], aware.kernels[1][:, :, 0, :]
    bumped = [np.einsum("ica,oib->ocab", v, h + 1e-2 * rng.standard_normal(h.shape)) for _ in range(3)]
    checks = [(plain, aware, bumped)]
    plain, aware = tucker(w, r, r), tucker(w, r, r, moment=m, damping=0.0)
    a_in, core, a_out = aware.kernels[0][:, :, 0, 0].T, aware.kernels[1], aware.kernels[2][:, :, 0, 0]
    bumped = [np.einsum("tsab,ot,cs->ocab", core + 1e-2 * rng.standard_normal(core.shape), a_out, a_in)
              for _ in range(3)]
    checks.append((plain, aware, bumped))
    for plain, aware, others in checks:
        best = error_of(w, aware, m)
        assert best <= error_of(w, plain, m) + 1e-9
        assert all(best <= relative(w, patch_matrix(o), m) + 1e-12 for o in others)


def relative(w: np.ndarray, approx: np.ndarray, m: np.ndarray) -> float:
    d = patch_matrix(w) - approx
    return float(np.sqrt(np.sum((m @ d) * d) / np.sum((m @ patch_matrix(w)) * patch_matrix(w))))


@pytest.mark.parametrize("scheme", ["spatial", "tucker"])
def test_reported_output_error_is_measured_and_data_aware_is_lower(scheme):
    model = conv(c_in=16, c_out=16, pads=[1, 1, 1, 1])
    rng = np.random.default_rng(5)
    scale = rng.uniform(0.05, 2, 16).reshape(1, 16, 1, 1)
    data = [{"x": (rng.standard_normal((2, 16, 11, 10)) * scale + 0.3).astype(np.float32)} for _ in range(4)]
    errors = []
    for aware in (False, True):
        ctx = PassContext(original=model, calib=open_source(data, model))
        out, records = run_pipeline(model, [make_spec("svd", {"rank": 4, "min-size": 0, "conv": scheme,
                                                              "data-aware": aware})], ctx)
        row = records[0].result.layers[0]
        ref = np.concatenate([run(model, d)[0] for d in data]).astype(np.float64)
        got = np.concatenate([run(out, d)[0] for d in data]).astype(np.float64)
        bias = np.asarray(rand(16, seed=4), np.float64).reshape(1, -1, 1, 1)   # the error is of X·W, bias apart
        assert row["output_error"] == pytest.approx(np.linalg.norm(ref - got) / np.linalg.norm(ref - bias), rel=1e-3)
        errors.append(row["output_error"])
    assert errors[1] < errors[0]


def test_rank_auto_covers_convs():
    """rank=auto factorizes a k×k Conv of low spatial rank as far as the pipeline's targets allow."""
    rng = np.random.default_rng(8)
    v, h = rng.standard_normal((2, 16, 3)), rng.standard_normal((16, 2, 3))
    w = (np.einsum("ica,oib->ocab", v, h) + 0.01 * rng.standard_normal((16, 16, 3, 3))).astype(np.float32)
    model = make_model([node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])], [("x", ["N", 16, 5, 5])],
                       ["y"], {"w": w})
    data = [{"x": rng.standard_normal((8, 16, 5, 5)).astype(np.float32)} for _ in range(2)]
    ctx = PassContext(original=model, calib=open_source(data, model))
    out, records = run_pipeline(model, [make_spec("svd", {"rank": "auto", "min-size": 0, "align": 2})], ctx)
    row = records[0].result.layers[0]
    assert ops(out) == ["Conv", "Conv"] and row["rank"] == "spatial 2" and row["output_error"] < 0.05
    assert records[0].result.notes[0].startswith("rank=auto: max-error=")
