#!/usr/bin/env python3
"""Build graphopt's small real decoder: a byte-level causal transformer trained on Python's own help text.

Text: the stdlib's ``pydoc_data/topics.py`` (the ``help()`` topics, Sphinx-generated from the Python docs; Python
Software Foundation License), the 79 topics joined in key order, UTF-8 bytes. The topics (whole documents) are split
by a seeded shuffle: about 10% of the bytes to evaluation, 5% to calibration, the rest to training, disjoint.

Model (pre-LN GPT): byte embedding (V = 256) + learned positions, 4 blocks of (LayerNorm, 4-head causal
self-attention with a constant additive mask, LayerNorm, MLP d -> 4d -> d with exact GELU), LayerNorm, an untied
head d -> V. Exported (TorchScript exporter, opset 17) as a fixed-length scorer: ``ids`` int64 [batch, T] ->
``logits`` float32 [batch, T, V]; logits[:, t] predicts the byte after position t. Every Linear weight is a constant
initializer ([in, out], named after the torch parameter), every Reshape shape a constant (no Shape/Gather chains).

Data files: ``decoder_calib.npz`` / ``decoder_eval.npz``, key ``ids`` int64 [N, T] (non-overlapping windows of the
held-out text) and ``__labels__`` int64 [N], the byte that follows each window. The next-byte targets of every
position are therefore ``concat(ids[:, 1:], __labels__[:, None])``; graphopt's label handling takes one class per
sample, so the [N] form is what it accepts (see models/decoder_metric.py).

Perplexity = exp(mean cross-entropy in nats per byte) over every position of the eval windows
(``decoder_metric.log_perplexity``, the same function as the ``--metric`` file uses).

Build-only dependencies, as for models/build.py (this module reuses its export helpers)::

    pip install torch==2.13.0 onnx onnxruntime numpy && pip install -e .
    python models/build_decoder.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pydoc_data.topics
import torch
import torch.nn as nn
import torch.nn.functional as F

from build import (HERE, OPSET, constants_to_initializers, name_initializers, set_determinism, sha256,
                   untie_initializers)
from decoder_metric import log_perplexity
from graphopt.runtime import count_macs

SEED = 20240917
VOCAB, T, D, LAYERS, HEADS = 256, 64, 128, 4, 4
N_CALIB, N_EVAL = 256, 256
TEST_WINDOWS = 64
MAX_BYTES = 4 * 1024 * 1024


def load_text() -> tuple[dict[str, bytes], str]:
    topics = pydoc_data.topics.topics
    docs = {k: topics[k].encode("utf-8") for k in sorted(topics)}
    digest = hashlib.sha256(b"".join(docs.values())).hexdigest()
    return docs, digest


def split_docs(docs: dict[str, bytes]) -> dict[str, bytes]:
    """Whole topics to eval (~10% of bytes), calib (~5%), train (the rest), by a seeded shuffle."""
    keys = list(docs)
    order = np.random.default_rng(SEED).permutation(len(keys))
    total = sum(len(v) for v in docs.values())
    parts: dict[str, list[bytes]] = {"eval": [], "calib": [], "train": []}
    got = {"eval": 0, "calib": 0}
    for i in order:
        text = docs[keys[i]]
        part = ("eval" if got["eval"] < 0.10 * total else
                "calib" if got["calib"] < 0.05 * total else "train")
        parts[part].append(text)
        if part in got:
            got[part] += len(text)
    return {k: b"\n".join(v) for k, v in parts.items()}


def windows(text: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n non-overlapping windows of T bytes spread evenly over the text, and the byte after each."""
    arr = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    stride = (len(arr) - 1) // n
    assert stride >= T + 1, f"text of {len(arr)} bytes too short for {n} windows of {T + 1}"
    starts = np.arange(n) * stride
    ids = np.stack([arr[s:s + T] for s in starts])
    return ids, arr[starts + T]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.h, self.dh = HEADS, D // HEADS
        self.qkv = nn.ModuleDict({k: nn.Linear(D, D) for k in ("q", "k", "v")})
        self.proj = nn.Linear(D, D)
        self.register_buffer("mask", torch.triu(torch.full((T, T), -1e9), diagonal=1), persistent=False)

    def _heads(self, t):  # [B,T,D] -> [B,H,T,dh]; constant sizes keep Reshape shapes constant
        return t.reshape(-1, T, self.h, self.dh).transpose(1, 2)

    def forward(self, x):
        q, k, v = (self._heads(self.qkv[n](x)) for n in ("q", "k", "v"))
        att = torch.matmul(q, k.transpose(-2, -1)) * (self.dh ** -0.5) + self.mask
        out = torch.matmul(torch.softmax(att, dim=-1), v).transpose(1, 2).reshape(-1, T, D)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.02)
        self.blocks = nn.Sequential(*[Block() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids) + self.pos)))


def train(train_text: bytes, ev: tuple[np.ndarray, np.ndarray], steps: int, batch: int, lr: float) -> ByteGPT:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    data = torch.from_numpy(np.frombuffer(train_text, dtype=np.uint8).astype(np.int64))
    model = ByteGPT()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "pos")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        model.train()
        starts = torch.randint(0, len(data) - T - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + T] for s in starts])
        y = torch.stack([data[s + 1:s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 199 or step == steps - 1:
            with torch.no_grad():
                model.eval()
                ppl = math.exp(log_perplexity(model(torch.from_numpy(ev[0])).numpy(), targets(*ev)))
            print(f"  step {step + 1:5d}/{steps} loss {loss.item():.4f} eval ppl(torch) {ppl:.3f} "
                  f"{time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return model


def targets(ids: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.concatenate([ids[:, 1:], after[:, None]], axis=1)


def export(model: ByteGPT, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, T, dtype=torch.int64),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["ids"], output_names=["logits"],
                          dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    m = name_initializers(untie_initializers(constants_to_initializers(onnx.load(str(path)))), model)
    dims = m.graph.output[0].type.tensor_type.shape.dim   # the exporter leaves T symbolic ("MatMullogits_dim_1")
    dims[1].Clear()
    dims[1].dim_value = T
    for n in m.graph.node:
        n.doc_string = ""
    m.doc_string = ""
    onnx.save(m, str(path))
    return m


def check_graph(m: onnx.ModelProto, path: Path) -> dict[str, int]:
    assert path.stat().st_size < MAX_BYTES, f"{path} is {path.stat().st_size} bytes"
    onnx.checker.check_model(m, full_check=True)
    g = m.graph
    inits = {i.name for i in g.initializer}
    assert [i.name for i in g.input if i.name not in inits] == ["ids"] and [o.name for o in g.output] == ["logits"]
    shape = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    assert shape == ["batch", T, VOCAB], shape
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    assert not set(ops) & {"Constant", "Identity", "Dropout", "Shape"}, ops
    const_mm = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(const_mm) == LAYERS * 6 + 1, f"{len(const_mm)} MatMuls with constant weights"
    return dict(sorted(ops.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: models/)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; the weights depend on it)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    set_determinism(args.threads)
    docs, digest = load_text()
    parts = split_docs(docs)
    data = {"calib": windows(parts["calib"], N_CALIB), "eval": windows(parts["eval"], N_EVAL)}
    for part, (ids, after) in data.items():
        np.savez_compressed(args.out / f"decoder_{part}.npz", ids=ids, __labels__=after)
    print(f"text {sum(map(len, docs.values())):,} B (sha256 {digest[:12]}); split "
          + ", ".join(f"{k} {len(v):,} B" for k, v in parts.items()), flush=True)

    model = train(parts["train"], data["eval"], args.steps, batch=64, lr=3e-3)
    path = args.out / "decoder.onnx"
    m = export(model, path)
    ops = check_graph(m, path)
    ids, after = data["eval"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"ids": ids})[0]
    with torch.no_grad():
        err = float(np.abs(model(torch.from_numpy(ids[:32])).numpy() - logits[:32]).max())
    assert err < 1e-3, f"torch vs onnxruntime max |diff| {err}"
    tgt = targets(ids, after)
    info = {
        "file": path.name, "calib": "decoder_calib.npz", "eval": "decoder_eval.npz",
        "input": {"name": "ids", "dtype": "int64", "shape": ["batch", T]},
        "architecture": {"vocab": VOCAB, "context": T, "d_model": D, "layers": LAYERS, "heads": HEADS, "ffn": 4 * D},
        "eval_perplexity_ort": round(math.exp(log_perplexity(logits, tgt)), 4),
        "eval_last_perplexity_ort": round(math.exp(log_perplexity(logits, after)), 4),
        "eval_top1_ort": round(float((logits.argmax(-1) == tgt).mean()), 4),
        # the first TEST_WINDOWS windows alone, which tests/test_models.py checks (the whole set is too slow for it)
        "eval_head_windows": TEST_WINDOWS,
        "eval_head_perplexity_ort": round(math.exp(log_perplexity(logits[:TEST_WINDOWS], tgt[:TEST_WINDOWS])), 4),
        "eval_head_top1_ort": round(float((logits[:TEST_WINDOWS].argmax(-1) == tgt[:TEST_WINDOWS]).mean()), 4),
        "eval_tokens": int(tgt.size),
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_sample": count_macs(m, {"ids": ids[:1]}),
        "bytes": path.stat().st_size, "sha256": sha256(path), "op_types": ops, "nodes": len(m.graph.node),
        "text": {"source": "pydoc_data/topics.py of CPython " + sys.version.split()[0] + " (PSF License)",
                 "sha256": digest, "split_bytes": {k: len(v) for k, v in parts.items()}, "seed": SEED},
        "training": {"steps": args.steps, "batch": 64, "lr": 3e-3, "threads": args.threads,
                     "torch": torch.__version__},
        "data_files": {f: sha256(args.out / f) for f in ("decoder_calib.npz", "decoder_eval.npz")},
    }
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("models", {})["decoder"] = info
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"decoder: eval perplexity {info['eval_perplexity_ort']} (last position {info['eval_last_perplexity_ort']}),"
          f" next-byte top-1 {info['eval_top1_ort']}, params {info['params']:,}, {info['bytes']:,} B, "
          f"torch/ort max|diff| {err:.2e}, {time.time() - t_start:.1f}s total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
