"""A folder of images (.jpg, .jpeg, .png, .bmp, .webp) as calibration or validation data: each image is one sample
of the model's one image input, decoded with Pillow (the optional extra ``graphopt[images]``) and preprocessed as
``--preprocess`` states (``preprocess``: color, resize, crop, scale, mean/std, layout, dtype, in that order).

On opening, ``ImageSource`` checks what it can without decoding: the model has one input without a default, of
rank 4 (a batch axis, then C,H,W or H,W,C) or 3 (no batch axis); the preprocessing's channel count fits it; every
file's header is readable and its size after resize and crop is what the model fixes (else one line saying what the
input expects and what the preprocessing gives). Without ``--preprocess`` a model with a fixed height or width is
refused with a line suggesting it (the normalisation is not guessed); one without is fed the raw RGB pixels, said in a
warning. Files are sorted by path (sub-folders included); with ``labels=folders`` the first sub-folder under the
folder names the class (sorted names, index = position). Images are decoded a batch at a time (the model's fixed
batch size, else ``batch_size``; consecutive images of one size), so memory does not grow with their number; each
batch goes through the same checks as any data (``checks.as_input``). A file that cannot be decoded is refused
with one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from graphopt.errors import GraphoptError, InputError, UsageError, one_line

from .checks import as_input, refuses_nonfinite, say_once
from .feeds import DEFAULT_BATCH, Batch, DataSource, Dim, InputSpec, show_shape
from .preprocess import Preprocess, parse_preprocess, preprocess_from_table, to_array

try:  # the optional extra: pip install 'graphopt[images]'
    from PIL import Image
    HAVE_PILLOW = True
except ImportError:  # pragma: no cover - exercised by patching HAVE_PILLOW
    Image = None
    HAVE_PILLOW = False

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NEEDS_PILLOW = "reading images needs Pillow: pip install 'graphopt[images]'"


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (sub-folders included, hidden files not), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def is_image_folder(folder: Path) -> bool:
    """A folder of images: no ``.npz`` files in it, and image files in it or in its sub-folders."""
    return not any(folder.glob("*.npz")) and bool(image_files(folder))


class ImageSource(DataSource):
    """One sample per image file in a folder, for a model with one image input (module docstring)."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], batch_size: int = DEFAULT_BATCH,
                 max_samples: int | None = None, purpose: str | None = None,
                 preprocess: Preprocess | None = None) -> None:
        if not HAVE_PILLOW:
            raise InputError(NEEDS_PILLOW)
        self.path = path
        self.refuse_nonfinite = refuses_nonfinite(purpose)
        self.warnings: list[str] = []
        self.spec = _image_input(path, inputs)
        dims = self.spec.shape or ()
        if preprocess is None:
            preprocess = _unstated(self.spec, path, self.warnings)
        self.pp = preprocess
        self.dims = _layout_dims(self.spec, preprocess)
        self.files = image_files(path)
        if max_samples is not None:
            self.files = self.files[:max_samples]
        if not self.files:
            raise InputError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.labels = _folder_labels(path, self.files) if preprocess.labels == "folders" else None
        if self.labels is None and any(len(f.relative_to(path).parts) > 1 for f in self.files):
            say_once(self.warnings, f"{path}: images in sub-folders are used without labels; "
                                    "--preprocess labels=folders takes each sub-folder's name as a class")
        fixed = dims[0] if len(dims) == 4 else None
        self.batch = 1 if len(dims) == 3 else fixed or batch_size
        self.sizes = [self._size(f) for f in self.files]
        if fixed and len(set(self.sizes)) > 1:
            raise InputError(f"{path}: input '{self.spec.name}' takes a fixed batch of {fixed} images of one size, "
                             "but the images have different sizes after preprocessing: add crop=... to --preprocess")
        if fixed and len(self.files) % fixed:
            keep = len(self.files) // fixed * fixed
            if keep == 0:
                raise InputError(f"{path}: {len(self.files)} images, fewer than the model's fixed batch of {fixed}")
            say_once(self.warnings, f"{path}: the model's fixed batch of {fixed} takes {keep} of the "
                                    f"{len(self.files)} images; the last {len(self.files) - keep} are left out")
            self.files, self.sizes = self.files[:keep], self.sizes[:keep]
        self.dtype = _out_dtype(preprocess, self.spec)
        classes = f", labels from {len(self.labels[1])} class folders" if self.labels is not None else ""
        self.description = f"{path.name}/ ({len(self.files)} images{classes})"

    def _size(self, f: Path) -> tuple[int, int]:
        """The (W, H) of image ``f`` after resize and crop, from its header; refused where the model fixes
        another."""
        try:
            with Image.open(f) as im:
                width, height = im.size
        except Exception as e:
            raise InputError(f"{f}: not a readable image: {one_line(e)}") from e
        try:
            w, h = self.pp.final_size(width, height)
        except ValueError as e:
            raise InputError(f"{f} ({width}x{height}) {e}") from None
        want_h, want_w = self.dims[1], self.dims[2]
        if (want_h is not None and want_h != h) or (want_w is not None and want_w != w):
            gives = self._show(self.pp.channels, h, w)
            fix = "crop=" + (str(want_w) if want_w == want_h else f"{want_w or w}x{want_h or h}")
            fix = ("use " if self.pp.crop is not None else "add ") + fix
            if self.pp.crop is None and (w < (want_w or 0) or h < (want_h or 0)):
                fix += f" with a resize of at least {max(want_w or 0, want_h or 0)}"
            raise InputError(f"input '{self.spec.name}' expects {self._show(*self.dims)} ({self.pp.layout.upper()}); "
                             f"--preprocess gives {gives} for {f.relative_to(self.path)} ({width}x{height}): {fix}")
        return w, h

    def _show(self, c: Dim, h: Dim, w: Dim) -> str:
        dims = (c, h, w) if self.pp.layout == "nchw" else (h, w, c)
        return "x".join("?" if d is None else str(d) for d in dims)

    def _decode(self, f: Path) -> np.ndarray:
        """Steps 1-3 of the preprocessing (Pillow): the image's uint8 pixels, H x W x C (H x W for gray)."""
        pp = self.pp
        try:
            with Image.open(f) as im:
                im = im.convert("L" if pp.color == "gray" else "RGB")
                size = pp.resized(*im.size)
                if size != im.size:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                if pp.crop is not None:
                    left, top = round((size[0] - pp.crop[0]) / 2), round((size[1] - pp.crop[1]) / 2)
                    im = im.crop((left, top, left + pp.crop[0], top + pp.crop[1]))
                pixels = np.asarray(im, dtype=np.uint8)
        except GraphoptError:
            raise
        except Exception as e:
            raise InputError(f"{f}: not a readable image: {one_line(e)}") from e
        return pixels[..., ::-1] if pp.color == "bgr" else pixels

    def __iter__(self) -> Iterator[Batch]:
        i = 0
        while i < len(self.files):
            j = i + 1
            while j < len(self.files) and j - i < self.batch and self.sizes[j] == self.sizes[i]:
                j += 1
            x = to_array([self._decode(f) for f in self.files[i:j]], self.pp, self.dtype)
            if len(self.spec.shape or ()) == 3:   # no batch axis: one image per feed
                x = x[0]
            feed = {self.spec.name: as_input(self.spec.name, x, self.spec, str(self.path), self.warnings,
                                             self.refuse_nonfinite)}
            labels = self.labels[0][i:j] if self.labels is not None else None
            yield Batch(feed, labels, j - i)
            i = j


def as_preprocess(preprocess: Preprocess | str | Mapping[str, Any] | None) -> Preprocess | None:
    """A Preprocess from what the API takes: one, its ``--preprocess`` text, a mapping of its keys, or None."""
    if preprocess is None or isinstance(preprocess, Preprocess):
        return preprocess
    if isinstance(preprocess, str):
        return parse_preprocess(preprocess)
    if isinstance(preprocess, Mapping):
        return preprocess_from_table(preprocess, "preprocess")
    raise UsageError(f"preprocess: expected 'key=value,...', a dict or a Preprocess, not {type(preprocess).__name__}")


def check_preprocess_used(preprocess: Any, *data: Any) -> None:
    """Refuse, before any data is read, a preprocessing that none of ``data`` (the raw ``--calib-data`` and
    ``--val-data``) would use: it applies to folders of images only."""
    if preprocess is not None and not any(
            isinstance(d, ImageSource) or (isinstance(d, (str, os.PathLike)) and Path(d).is_dir()
                                           and is_image_folder(Path(d))) for d in data):
        raise UsageError("--preprocess applies to a folder of images, and neither --calib-data nor --val-data is one")


def _image_input(path: Path, inputs: Sequence[InputSpec]) -> InputSpec:
    """The model's one image input: the only input without a default, a tensor of rank 4 or 3."""
    needed = [s for s in inputs if not s.has_default]
    if len(needed) != 1:
        raise InputError(f"{path}: a folder of images feeds a model with one image input, but this model has "
                         f"{len(needed)} inputs ({', '.join(s.name for s in needed) or 'none'}): give an .npz")
    spec = needed[0]
    if spec.dtype is None or spec.shape is None or len(spec.shape) not in (3, 4):
        raise InputError(f"{path}: input '{spec.name}' {show_shape(spec.shape)} is not an image input: a folder of "
                         "images needs one of rank 4 (N,C,H,W or N,H,W,C) or 3 (C,H,W or H,W,C)")
    return spec


def _layout_dims(spec: InputSpec, pp: Preprocess) -> tuple[Dim, Dim, Dim]:
    """The model's (C, H, W) as ``pp.layout`` reads the input's dims; a channel count other than the preprocessing
    gives is refused, suggesting the key that fits."""
    dims = (spec.shape or ())[-3:]
    c, h, w = dims if pp.layout == "nchw" else (dims[2], dims[0], dims[1])
    if c is None or c == pp.channels:
        return c, h, w
    other = "nhwc" if pp.layout == "nchw" else "nchw"
    c2 = dims[2] if other == "nhwc" else dims[0]
    fix = (f"add layout={other}" if c2 == pp.channels else "add color=gray" if c == 1
           else "use color=rgb or color=bgr" if c == 3 else f"the model takes {c} channels, images give 1 or 3")
    shown = "x".join("?" if d is None else str(d) for d in dims)
    raise InputError(f"input '{spec.name}' expects {shown} ({pp.layout.upper()}, {_count(c, 'channel')}); "
                     f"--preprocess gives {_count(pp.channels, 'channel')} (color={pp.color}): {fix}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _unstated(spec: InputSpec, path: Path, warnings: list[str]) -> Preprocess:
    """The preprocessing without ``--preprocess``: refused for a model with a fixed height or width (its
    normalisation is not guessed), else the raw RGB pixels, NCHW, with a warning."""
    dims = (spec.shape or ())[-3:]
    nhwc = len(dims) == 3 and dims[2] in (1, 3) and dims[0] not in (1, 3)
    c, h, w = (dims[2], dims[0], dims[1]) if nhwc else dims
    if h is not None or w is not None:
        size = str(w) if w == h else f"{w or h}x{h or w}"
        example = (f"resize={size},crop={size},scale=1/255" + (",layout=nhwc" if nhwc else "")
                   + (",color=gray" if c == 1 else ",mean=.../...,std=.../..."))
        raise UsageError(f"{path}: images for input '{spec.name}' {show_shape(spec.shape)}: state the model's "
                         f"preprocessing once with --preprocess (e.g. {example})")
    say_once(warnings, f"{path}: images fed as raw RGB pixels 0..255 in NCHW (no --preprocess): state the model's "
                       "resize, scale, mean/std and layout with --preprocess")
    return Preprocess()


def _folder_labels(path: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """(label per file, class names): the first sub-folder under ``path`` names each file's class."""
    loose = [f for f in files if len(f.relative_to(path).parts) < 2]
    if loose:
        raise InputError(f"{loose[0]}: labels=folders takes each image's class from its sub-folder, and this one is "
                         f"in {path} itself: move it into a class folder")
    names = sorted({f.relative_to(path).parts[0] for f in files})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[f.relative_to(path).parts[0]] for f in files], dtype=np.int64), names


def _out_dtype(pp: Preprocess, spec: InputSpec) -> np.dtype[Any]:
    """The dtype of the arrays: ``dtype=`` if given, else the input's float type, else uint8 pixels when the
    preprocessing keeps them whole, else float32 (the checks then say what the input cannot take)."""
    if pp.dtype is not None:
        return np.dtype(pp.dtype)
    if spec.dtype is not None and spec.dtype.kind == "f":
        return spec.dtype
    return np.dtype(np.float32) if pp.normalizes else np.dtype(np.uint8)
