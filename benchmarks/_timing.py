"""Paired latency rounds for the benchmarks: every session runs once per round, in a rotating order, timed on two
clocks at once (helper of bench_fusion and bench_quantize).

``wall`` is perf_counter; ``cpu`` is the calling thread's CPU time, which with one intra-op thread is where
onnxruntime runs every kernel, so time lost to other processes on a shared machine is not counted. Per-round times
of two sessions give paired ratios, which drift far less on a noisy machine than a ratio of two medians.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np


def paired_rounds(sessions: Sequence[Any], feed: dict[str, np.ndarray], budget_s: float, min_rounds: int,
                  max_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """(wall, cpu) seconds, each [rounds, sessions]: 3 warm-up runs each, then as many rounds (within
    [min_rounds, max_rounds]) as fit ``budget_s`` by a first round's time, session i starting round r at (r+i)."""
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    t0 = time.perf_counter()
    for s in sessions:
        s.run(None, feed)
    one_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / one_round)))
    k = len(sessions)
    wall, cpu = np.zeros((rounds, k)), np.zeros((rounds, k))
    for r in range(rounds):
        for i in [(r + j) % k for j in range(k)]:
            c, t = time.thread_time(), time.perf_counter()
            sessions[i].run(None, feed)
            wall[r, i], cpu[r, i] = time.perf_counter() - t, time.thread_time() - c
    return wall, cpu
