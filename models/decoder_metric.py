"""Perplexity metric for models/decoder.onnx (the byte-level scorer), in the ``--metric FILE.py:function`` form:
``function(reference_outputs, candidate_outputs, labels) -> float``, higher is better.

``perplexity`` returns float perplexity / candidate perplexity: 1.0 when the candidate predicts the held-out bytes
exactly as well as the float model, below 1 when it does worse (0.95 = 5% higher perplexity, the int4 goal of
issue 25), above 1 when it happens to do better. Perplexity = exp(mean over predicted positions of -log softmax(
logits)[target]), in nats per byte, computed in float64 with a max-shifted log-sum-exp.

``labels`` are the next-byte targets, either
  * int [N, T]: the byte after every position (``concat(ids[:, 1:], __labels__[:, None])`` for the shipped data),
    scoring all N*T positions; or
  * int [N]: the byte after each window (``__labels__`` of ``decoder_calib.npz`` / ``decoder_eval.npz``, the form
    graphopt's label handling accepts, one class per sample), scoring the last position of each window.
Only numpy; the output is found by name (``logits``) or, failing that, as the one float output of rank 3.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def log_perplexity(logits: np.ndarray, labels: np.ndarray | None) -> float:
    """Mean negative log-likelihood (nats) of ``labels`` under ``logits`` [N, T, V] (labels [N, T]) or of the last
    position (labels [N])."""
    if labels is None:
        raise ValueError("perplexity needs the next-token ids as labels: the data's '__labels__' ([N], the token after "
                         "each window) or [N, T]")
    logits = np.asarray(logits)
    labels = np.asarray(labels).astype(np.int64)
    if labels.ndim == 1:
        logits = logits[:, -1]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels of shape {list(labels.shape)} do not fit logits of shape {list(logits.shape)}: "
                         "give the next-token ids, [N, T] or [N] (the token after each window)")
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    return float((lse - picked).mean())


def _logits(outputs: Mapping[str, Any]) -> np.ndarray:
    if "logits" in outputs:
        return np.asarray(outputs["logits"])
    ranked = [np.asarray(v) for v in outputs.values() if np.asarray(v).ndim == 3 and np.asarray(v).dtype.kind == "f"]
    if len(ranked) != 1:
        raise ValueError(f"no 'logits' output and {len(ranked)} float outputs of rank 3 among {sorted(outputs)}")
    return ranked[0]


def perplexity(reference_outputs: Mapping[str, Any], candidate_outputs: Mapping[str, Any], labels: Any) -> float:
    """float perplexity / candidate perplexity on ``labels`` (higher is better; 1.0 = as good as float)."""
    ref = log_perplexity(_logits(reference_outputs), labels)
    cand = log_perplexity(_logits(candidate_outputs), labels)
    return float(np.exp(ref - cand))
