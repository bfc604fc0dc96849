"""prune-weights: magnitude pruning (unstructured / 2:4, per layer / global) with the masked least-squares refit.

The math as hypothesis properties (exact sparsity per layer and globally, 2:4 in every group of four input
channels, the refit is the least-squares optimum and never worse than zeroing), the pass through the real pipeline
(fires, numerically bounded in onnxruntime with optimizations off, declines with reasons, a second run changes
nothing, checker-valid), sparse storage that onnxruntime loads, zeros kept by quantize, and bad options.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.calibration.readers import open_source
from graphopt.graph import import_graph, to_sparse_initializers
from graphopt.passes.base import PassContext
from graphopt.passes.prune_weights import LAYERS_PRUNED
from graphopt.passes.sparsity.masks import global_masks, lowest, output_error, refit, two_four_mask
from graphopt.pipeline import make_spec, run_pipeline
from graphopt.validate import DEFAULT_TARGETS, Thresholds
from graphs import MODELS, assert_one_line_error, declined, ops, run, two_layer_mlp

SEEDS = st.integers(0, 2**16)


def mlp(k: int = 32, hidden: int = 32, shared: bool = False) -> onnx.ModelProto:
    return two_layer_mlp(k, hidden, shared=shared)


def calib(k: int = 32, n: int = 512) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    scale = np.linspace(0.2, 2.0, k).astype(np.float32)    # inputs of unequal energy: the refit has work to do
    return [{"x": (rng.standard_normal((64, k)) * scale).astype(np.float32)} for _ in range(n // 64)]


def prune(model: onnx.ModelProto, data=None, targets=DEFAULT_TARGETS, **opts):
    ctx = PassContext(original=model, calib=open_source(data, model) if data is not None else None, targets=targets)
    return run_pipeline(model, [make_spec("prune-weights", {"min-size": 0, **opts})], ctx)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in import_graph_model(model).graph.initializer}


def import_graph_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with sparse initializers made dense (as graphopt reads them)."""
    from graphopt.graph import export
    return export(import_graph(model), model)


# ---------------------------------------------------------------------------------------------- the math


@settings(max_examples=25, deadline=None)
@given(SEEDS, st.floats(0.0, 0.95), st.integers(1, 3), st.integers(2, 9))
def test_layer_and_global_sparsity_exact(seed, s, g, d):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((g, 5, d)), rng.standard_normal((1, 3, 4 * d))
    assert lowest(np.abs(a), round(s * a.size)).sum() == round(s * a.size)
    ma, mb = global_masks([np.abs(a), np.abs(b)], s)
    assert ma.sum() + mb.sum() == round(s * (a.size + b.size))
    if ma.any() and (~mb).any():     # global: nothing kept scores below anything pruned
        assert np.abs(a)[ma].max() <= max(np.abs(b)[~mb].min(), np.abs(a)[~ma].min(initial=np.inf))


@settings(max_examples=25, deadline=None)
@given(SEEDS, st.integers(1, 3), st.integers(1, 4))
def test_two_four_in_every_group_of_four(seed, quads, taps):
    score = np.abs(np.random.default_rng(seed).standard_normal((2, 3, 4 * quads * taps)))
    mask = two_four_mask(score, taps).reshape(2, 3, quads, 4, taps)
    assert (mask.sum(axis=3) == 2).all()
    s = score.reshape(mask.shape)
    assert (np.where(mask, s, -np.inf).max(axis=3) <= np.where(mask, np.inf, s).min(axis=3)).all()


@settings(max_examples=20, deadline=None)
@given(SEEDS, st.floats(0.1, 0.9))
def test_refit_is_the_masked_least_squares_optimum(seed, s):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 10)) * np.linspace(0.1, 3, 10) + rng.standard_normal((200, 1))
    h = (x.T @ x / 200)[None]
    w = rng.standard_normal((1, 4, 10))
    mask = lowest(np.abs(w), round(s * w.size))
    new = refit(w, mask, h, damping=0.0)
    assert (new[mask] == 0).all()
    for o in range(4):
        keep = ~mask[0, o]
        if keep.any():
            best = np.linalg.lstsq(x[:, keep], x @ w[0, o], rcond=None)[0]
            np.testing.assert_allclose(new[0, o, keep], best, rtol=1e-6, atol=1e-8)
    assert output_error(w, new, h) <= output_error(w, np.where(mask, 0, w), h) + 1e-12
    np.testing.assert_array_equal(refit(new, mask, h, damping=0.0), new)     # refitting again changes nothing


# ---------------------------------------------------------------------------------------------- the pass


def test_fires_bounded_and_refit_helps():
    model = mlp()
    data = calib()
    plain, _ = prune(model, sparsity=0.5)
    out, records = prune(model, data, sparsity=0.5)
    assert ops(out) == ops(model) == ["Gemm", "Relu", "MatMul"]
    assert records[-1].result.counts[LAYERS_PRUNED] == 2
    w = weights(out)
    assert all((v == 0).mean() == 0.5 for v in w.values() if v.ndim == 2)
    onnx.checker.check_model(out, full_check=True)
    x = calib(n=128)[1]["x"]                      # other samples drawn like the calibration data
    ref, got, mag = run(model, {"x": x})[0], run(out, {"x": x})[0], run(plain, {"x": x})[0]
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < np.linalg.norm(mag - ref) / np.linalg.norm(ref)     # the refit beats zeroing alone
    assert err < 0.5                                                  # stated bound for half the weights of a random MLP


def test_declines_and_second_run_changes_nothing():
    model = mlp(shared=True)
    out, records = prune(model, sparsity=0.5)
    reasons = declined(records)
    assert any("fc2" in r and "shared" in r for r in reasons)
    out2, records2 = prune(out, sparsity=0.5)
    assert not records2[-1].result.changed
    small = mlp(k=16, hidden=16)                  # 256 and 128 weights: below the default min-size
    _, rec = run_pipeline(small, [make_spec("prune-weights", {})], PassContext(original=small))
    assert any("< min-size 1024" in r for r in declined(rec)) and not rec[-1].result.changed


def test_two_four_needs_channels_in_fours():
    model = mlp(k=30)
    out, records = prune(model, pattern="2:4")
    assert any("30 input channels per group, not a multiple of 4" in r for r in declined(records))
    w2 = weights(out)["w2"]                       # the MatMul (32 inputs) is pruned 2:4 along its input axis
    assert ((w2.reshape(8, 4, 8) == 0).sum(axis=1) == 2).all()


def test_sparse_storage_loads_in_onnxruntime_and_is_smaller():
    model = mlp(k=64, hidden=64)
    out, _ = prune(model, sparsity=0.9)
    assert len(out.graph.sparse_initializer) == 2 and not any(t.dims == [64, 64] for t in out.graph.initializer)
    assert out.ByteSize() < 0.5 * model.ByteSize()
    onnx.checker.check_model(out)
    dense, _ = prune(model, sparsity=0.9, storage="dense")
    assert not dense.graph.sparse_initializer
    x = {"x": calib(k=64)[0]["x"]}
    np.testing.assert_array_equal(run(out, x)[0], run(dense, x)[0])
    assert to_sparse_initializers(dense) == 2    # the same encoding, on the dense model


def test_quantize_keeps_the_zeros():
    model = mlp(k=64, hidden=64)
    data = calib(k=64)
    for rounding in ("nearest", "gptq"):
        # no targets: the fallback keeps nothing float, so every weight is int8 (what the test is about)
        ctx = PassContext(original=model, calib=open_source(data, model), targets=Thresholds())
        out, _ = run_pipeline(model, [make_spec("prune-weights", {"min-size": 0, "sparsity": 0.6}),
                                      make_spec("quantize", {"rounding": rounding, "objective": "size"})], ctx)
        ints = [v for v in weights(out).values() if v.dtype == np.int8 and v.ndim == 2]
        assert len(ints) == 2 and all((v == 0).sum() >= round(0.6 * v.size) for v in ints), rounding


@pytest.mark.parametrize("spec, needle", [
    ("prune-weights:sparsity=1.5", "sparsity"),
    ("prune-weights:pattern=2:4,sparsity=0.7", "pattern=2:4 prunes exactly half"),
    ("prune-weights:pattern=2:4,scope=global", "scope=global does not apply"),
    ("prune-weights:scope=row", "scope"),
    ("prune-weights:sparsity=auto", "needs calibration data"),
])
def test_bad_options_are_one_line(cli, tmp_path, spec, needle):
    assert_one_line_error(cli(MODELS / "mnist_mlp.onnx", tmp_path / "o.onnx", "--pass", spec), 2, needle)


def test_auto_keeps_the_targets():
    model, data = mlp(), calib()
    # min-cosine only: the 8 outputs of a random MLP are near ties, whose top-1 flips at any change
    out, records = prune(model, data, dataclasses.replace(DEFAULT_TARGETS, min_top1=0.0), sparsity="auto")
    note = next(n for n in records[-1].result.notes if n.startswith("sparsity=auto:"))
    chosen = records[-1].result.counts["sparsity chosen"]
    assert 0 < chosen < 0.9 and "misses" in note          # a random MLP has no free half: the search stops short
    x = {"x": calib(n=128)[1]["x"]}
    ref, got = run(model, x)[0].ravel(), run(out, x)[0].ravel()
    assert ref @ got / np.linalg.norm(ref) / np.linalg.norm(got) > 0.97   # min-cosine 0.98 on calibration data


def test_mnist_mlp_through_the_cli(cli, tmp_path):
    res = cli(MODELS / "mnist_mlp.onnx", tmp_path / "o.onnx", "--pass", "prune-weights:sparsity=0.5", "--latency-runs", 0,
              "--calib-data", MODELS / "mnist_calib.npz", "--val-data", MODELS / "mnist_eval.npz")
    assert res.code == 0, res.err
    assert "layers pruned" in res.out and "PASSED" in res.out and "zipped (zlib -6)" in res.out
