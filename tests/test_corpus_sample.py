"""A fixed sample of onnx's own operator test cases through graphopt's default pipeline.

``benchmarks/onnx_corpus.py`` runs all ~1,900 cases of ``onnx.backend.test.case.node.collect_testcases``; this runs
~40 diverse ones (built in a tmp dir from the installed onnx) with the same code: the CLI in-process with
``--val-data`` (the Python API for inputs .npz cannot hold), then the written model is checked against the original
on the test's own inputs. Every case must end written with equal outputs, or with exit 2 and one clear line.
Only the onnx modules that define the sample are imported (``MODULES``; each export seeds numpy, so a case is the
same as in the whole corpus): importing all ~200 runs every export and took 6 of the test's 7 s.
The cases marked REGRESSION crashed or lost information before (optional/map types and TYPE_PROTO attributes that
onnx-graphsurgeon cannot round-trip; onnxruntime messages with C++ signatures; bfloat16/float8 inputs and outputs
that onnxruntime's Python API cannot exchange, which gave an unreadable message).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
from bench_support import load_benchmark


# Must end written + validated (exit 0) with outputs equal to the original's.
OK = [
    "test_abs", "test_add_bcast", "test_conv_with_strides_padding", "test_gemm_default_scalar_bias",
    "test_batchnorm_epsilon", "test_constant", "test_constant_pad", "test_constantofshape_int_zeros",
    # expanded functions: many Constant nodes, folded by fold-constants
    "test_layer_normalization_4d_axis0_expanded_ver18", "test_attention_3d_expanded",
    "test_softmax_example_expanded_ver18", "test_gelu_tanh_1_expanded", "test_sce_mean_weight_ii_3d_log_prob_expanded",
    "test_center_crop_pad_crop_expanded",
    # control flow and subgraphs
    "test_range_float_type_positive_delta_expanded", "test_scan9_sum", "test_loop11", "test_if",
    # strings, data-dependent shapes, misc
    "test_string_concat", "test_equal_string", "test_unique_sorted_with_axis", "test_nonzero_example", "test_top_k",
    "test_resize_upsample_scales_linear", "test_einsum_batch_diagonal", "test_split_to_sequence_2",
    "test_cast_FLOAT_to_FLOAT8E4M3FN",
    # REGRESSION: optional / nested-sequence types in graph inputs, outputs and subgraphs; Optional's TYPE_PROTO
    "test_if_opt", "test_if_seq", "test_loop13_seq", "test_loop16_seq_none", "test_identity_opt",
    "test_identity_sequence", "test_sequence_map_identity_1_sequence", "test_sequence_map_add_2_sequences_expanded",
]
# Must end written (exit 0) or refused with exit 2 and a clear one-line message (depends on what onnxruntime runs).
OK_OR_REFUSED = [
    "test_optional_get_element_sequence", "test_optional_has_element_empty_optional_input",
    "test_cast_BFLOAT16_to_FLOAT", "test_cast_FLOAT_to_FLOAT8E5M2",  # REGRESSION: clear message
    "test_gru_batchwise",  # REGRESSION: onnxruntime message without C++ source location and signature
    "test_not_2d", "test_max_int16", "test_convinteger_with_padding",
]
SAMPLE = OK + OK_OR_REFUSED
# The modules of onnx.backend.test.case.node that define the sample's cases (one per operator).
MODULES = [
    "abs", "add", "attention", "batch_normalization", "cast", "center_crop_pad", "constant", "constantofshape", "conv",
    "convinteger", "einsum", "equal", "gelu", "gemm", "gru", "identity", "if_", "layernormalization", "loop", "max",
    "nonzero", "not_", "optionalgetelement", "optionalhaselement", "pad", "rangeop", "resize", "scan",
    "sequence_map", "softmax", "softmax_cross_entropy_loss", "splittosequence", "string_concat", "topk", "unique",
]


def _load_corpus_module():
    return load_benchmark("onnx_corpus")


def _collect_sample() -> dict:
    """The sample's test cases: importing a module of onnx's node test corpus runs its exports, which add their
    cases to the package's list (what ``collect_testcases`` does for all of them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        node = importlib.import_module("onnx.backend.test.case.node")
        for name in MODULES:
            importlib.import_module(f"{node.__name__}.{name}")
    return {c.name: c for c in node._NodeTestCases if c.name in SAMPLE}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    mod = _load_corpus_module()
    cases = _collect_sample()
    missing = sorted(set(SAMPLE) - set(cases))
    assert not missing, f"not in this onnx's test corpus (or not in MODULES): {missing}"
    root = tmp_path_factory.mktemp("corpus")
    for name, case in cases.items():
        mod.materialise_case(case, root / name)
    out = tmp_path_factory.mktemp("out")
    return mod, root, out


def _check_refusal(rec):
    msg = rec["message"]
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert "[ONNXRuntimeError]" not in msg and "onnxruntime_src" not in msg, msg
    assert "Numpy_type" not in msg and "No corresponding Numpy type" not in msg, msg


@pytest.mark.parametrize("name", SAMPLE)
def test_corpus_case(corpus, name):
    mod, root, out = corpus
    rec = mod.run_case(root / name, out)
    if name in OK:
        assert rec["outcome"] == "ok", rec
    else:
        assert rec["outcome"] in ("ok", "exit-2"), rec
        if rec["outcome"] == "exit-2":
            _check_refusal(rec)
    if name in ("test_cast_BFLOAT16_to_FLOAT", "test_cast_FLOAT_to_FLOAT8E5M2") and rec["outcome"] == "exit-2":
        assert "onnxruntime's Python API cannot" in rec["message"], rec


def test_equal_compares_nested_values():
    import numpy as np

    mod = _load_corpus_module()
    a = [np.array([1.0, np.nan], np.float32), None]
    assert mod._equal(a, [np.array([1.0, np.nan], np.float32), None], 1e-3, 1e-7) is None
    assert mod._equal(a, [np.array([1.1, np.nan], np.float32), None], 1e-3, 1e-7)
    assert mod._equal(a, [np.array([1.0, np.nan], np.float32)], 1e-3, 1e-7)
    assert mod._equal(np.array([1, 2]), np.array([1, 3]), 1e-3, 1e-7)
    assert mod._equal(None, np.zeros(1), 1e-3, 1e-7)
