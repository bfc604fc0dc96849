"""Fewer switchable-model runs in the quantize fallback's searches (issue 24, the pass's own time): the first search
tries one tensor float first, and the contiguous candidate searches the suffix only below the prefix's k. Where the
targets hold from some k on (what the binary search assumes), both find what the full searches found."""

from __future__ import annotations

import math

import pytest
from graphopt.passes.quantization.fallback import Fallback


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
    for answer in range(0, n + 1):
        fb, runs = _search(n, answer)
        k = fb.first_k()
        ref, _ = _search(n, answer)
        assert k == _full_search(ref, ref.order) == max(1, min(answer, n))
        assert len(runs) <= math.ceil(math.log2(n)) + 2 and ("prefix", n) not in runs   # never every tensor float
        if answer <= 1 and n > 1:
            assert len(runs) == 1


@pytest.mark.parametrize("n", [2, 9, 40])
def test_shortest_run_is_the_shorter_of_both_full_searches(n: int) -> None:
    sites = [f"t{i}" for i in range(n)]
    for prefix in range(0, n + 1):
        for suffix in range(0, n + 1):
            fb, runs = _search(n, prefix, suffix)
            k, side = fb.shortest_run(sites)
            ref, _ = _search(n, prefix, suffix)
            kp, ks = _full_search(ref, sites), _full_search(ref, sites[::-1])
            assert (k, side) == (kp, "prefix") if kp <= ks else (ks, "suffix")
            assert fb.order == (sites if side == "prefix" else sites[::-1])
            if ks >= kp:    # a suffix no shorter than the prefix costs one run at most
                assert sum(s == "suffix" for s, _ in runs) <= 1
