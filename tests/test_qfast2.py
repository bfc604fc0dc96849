"""The quantize fallback's own time (issue 24): fewer switchable-model runs in the searches (the first search tries
one tensor float first, the contiguous candidate searches the suffix only below the prefix's k: where the targets
hold from some k on, what the binary search assumes, both find what the full searches found), and a cheaper
switchable model (a unit's own input quantization, op and fused activation in one If: the same values)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from graphopt.passes.quantization import build as build_mod
from graphopt.passes.quantization import switch as switch_mod
from graphopt.passes.quantization.fallback import Fallback
from graphs import calib, session
from onnx import helper
from test_qfast import switchable_builder


def _search(n: int, answer: int, suffix_answer: int | None = None) -> tuple[Fallback, list[tuple[str, int]]]:
    """A Fallback over ``n`` sites t0..t(n-1) (in computing order) whose switchable model meets the targets exactly
    when a prefix of ``answer`` or more of them is float, or a suffix of ``suffix_answer`` or more; each run's
    (side, k)."""
    fb = Fallback.__new__(Fallback)
    sites = [f"t{i}" for i in range(n)]
    fb.order, fb.search_feeds = list(sites), []
    runs: list[tuple[str, int]] = []

    def meets(quantized: set[str], feeds: list, confident: bool) -> bool:
        floated = [t for t in sites if t not in quantized]
        k = len(floated)
        if floated == sites[:k]:
            side, need = "prefix", answer
        else:
            assert floated == sites[n - k:]
            side, need = "suffix", suffix_answer if suffix_answer is not None else n + 1
        runs.append((side, k))
        return k >= need or k == n

    fb.meets = meets        # type: ignore[method-assign]
    return fb, runs


def _full_search(fb: Fallback, order: list[str]) -> int:
    fb.order = order
    return fb.smallest_k(1, [], False)


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_first_k_is_the_binary_searchs_answer(n: int) -> None:
    for answer in range(n + 1):
        fb, runs = _search(n, answer)
        k = fb.first_k()
        ref, _ = _search(n, answer)
        assert k == _full_search(ref, ref.order) == max(1, min(answer, n))
        assert len(runs) <= math.ceil(math.log2(n)) + 2 and ("prefix", n) not in runs   # never every tensor float
        if answer <= 1 and n > 1:
            assert len(runs) == 1


@pytest.mark.parametrize("n", [2, 9, 24])
def test_shortest_run_is_the_shorter_of_both_full_searches(n: int) -> None:
    sites = [f"t{i}" for i in range(n)]
    for prefix in range(n + 1):
        for suffix in range(n + 1):
            fb, runs = _search(n, prefix, suffix)
            k, side = fb.shortest_run(sites)
            ref, _ = _search(n, prefix, suffix)
            kp, ks = _full_search(ref, sites), _full_search(ref, sites[::-1])
            assert (k, side) == (kp, "prefix") if kp <= ks else (ks, "suffix")
            assert fb.order == (sites if side == "prefix" else sites[::-1])
            if ks >= kp:    # a suffix no shorter than the prefix costs one run at most
                assert sum(s == "suffix" for s, _ in runs) <= 1


def test_a_units_own_input_quantization_op_and_activation_share_one_if(monkeypatch: pytest.MonkeyPatch) -> None:
    _, builder = switchable_builder()      # conv_net's switchable build, test_qfast's helper
    sw = builder.build(switchable=True)
    branches = {n.name: [[x.op_type for x in helper.get_attribute_value(a).node] for a in n.attribute]
                for n in sw.model.graph.node if n.op_type == "If"}
    # conv1 alone reads x: its If quantizes x itself and runs Conv+Relu; r1 (read by conv2 and the Add) and the
    # Gemm's input f (read by the Gemm alone) likewise
    assert [["QuantizeLinear", "DequantizeLinear", "Conv", "Relu"], ["Conv", "Relu"]] in branches.values()
    assert [["QuantizeLinear", "DequantizeLinear", "Gemm"], ["Gemm"]] in branches.values()
    assert [["Conv", "Clip"], ["Conv", "Clip"]] in branches.values()         # conv2: r1 has its own If
    assert [["QuantizeLinear", "DequantizeLinear"], ["Identity"]] in branches.values()
    assert not any(n.op_type in ("Conv", "Relu", "Clip", "Gemm") for n in sw.model.graph.node)
    # the same values, to the bit, as with every input's quantization in an If of its own
    real = switch_mod.switched_op
    monkeypatch.setattr(build_mod, "switched_op", lambda g, name, s, node, fake, act=None, source=None:
                        real(g, name, s, node, fake, None, None))
    apart = builder.build(switchable=True)
    assert len(apart.model.graph.node) > len(sw.model.graph.node) and apart.switches == sw.switches
    feed = calib(8)[0]
    names = list(sw.switches.values())
    merged, separate = session(sw.model, True), session(apart.model, True)
    for bits in itertools.product([False, True], repeat=len(names)):
        on = {n: np.array(b) for n, b in zip(names, bits)}
        for a, b in zip(merged.run(None, {**feed, **on}), separate.run(None, {**feed, **on})):
            assert np.array_equal(a, b)
