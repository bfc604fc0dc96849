"""The preprocessing a user states once for a folder of images (``--preprocess k=v,...`` or a recipe's
``[preprocess]`` table), parsed into a frozen ``Preprocess``, and its math. For each image, in order:
  1. color: decoded to RGB (alpha dropped), BGR (RGB with the channels reversed) or gray (Pillow's "L":
     L = R * 299/1000 + G * 587/1000 + B * 114/1000), 8 bits per channel;
  2. resize: ``resize=N`` scales the shorter side to N keeping the aspect ratio (the longer side N * long / short,
     rounded down, as torchvision), ``resize=WxH`` to exactly W x H; Pillow's bilinear filter (antialiased when
     shrinking, as torchvision's PIL path);
  3. crop: ``crop=N`` or ``crop=WxH`` takes the centre, left = round((width - W) / 2), top = round((height - H) / 2);
     an image smaller than the crop is refused;
  4. x = pixel * scale (``scale=1/255``: a number or a fraction a/b), in float32;
  5. x = (x - mean) / std per channel (one value for all channels, or one per channel in the output's order: B, G, R
     for color=bgr);
  6. layout: nchw gives C x H x W per image, nhwc H x W x C; images are stacked on a batch axis in front;
  7. dtype: the model input's float type unless ``dtype=`` says (a cast to the input is then checked as any data's).
Steps 1-3 run in Pillow (``images``), 4-7 here (``to_array``). ``labels=folders`` takes class labels from the names
of the sub-folders (sorted, index = position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from graphopt.errors import UsageError

KEYS = ("resize", "crop", "scale", "mean", "std", "layout", "color", "dtype", "labels")
CHOICES = {"layout": ("nchw", "nhwc"), "color": ("rgb", "bgr", "gray"),
           "dtype": ("float32", "float16", "float64", "uint8"), "labels": ("none", "folders")}
MAX_SIDE = 1 << 15

Size = tuple[int, int]   # (width, height)


@dataclass(frozen=True)
class Preprocess:
    """What ``--preprocess`` states (module docstring); ``resize`` is an int (the shorter side) or (W, H)."""

    resize: int | Size | None = None
    crop: Size | None = None
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"
    color: str = "rgb"
    dtype: str | None = None
    labels: str = "none"

    def __post_init__(self) -> None:
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value is not None and value not in choices:
                raise ValueError(f"{key}={value}: expected one of {'|'.join(choices)}")
        for key in ("mean", "std"):
            n = len(getattr(self, key))
            if n not in (1, self.channels):
                raise ValueError(f"{key} has {n} values but color={self.color} gives {self.channels} "
                                 f"channel{'s' if self.channels > 1 else ''}: give one value or one per channel")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"scale={self.scale}: expected a positive number")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError("mean must be finite and std positive")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def normalizes(self) -> bool:
        """Whether steps 4-5 change the pixel values."""
        return self.scale != 1.0 or any(self.mean) or any(v != 1.0 for v in self.std)

    def resized(self, width: int, height: int) -> Size:
        """The (W, H) an image of ``width`` x ``height`` has after resize (step 2)."""
        if isinstance(self.resize, int):
            n = self.resize
            return (n, max(1, int(n * height / width))) if width <= height else (max(1, int(n * width / height)), n)
        return self.resize if self.resize is not None else (width, height)

    def final_size(self, width: int, height: int) -> Size:
        """The (W, H) an image of ``width`` x ``height`` has after resize and crop; ValueError if the crop does not
        fit."""
        w, h = self.resized(width, height)
        if self.crop is not None:
            if self.crop[0] > w or self.crop[1] > h:
                raise ValueError(f"is {w}x{h} after resize, smaller than crop={_size_text(self.crop)}")
            w, h = self.crop
        return w, h

    def __str__(self) -> str:
        """The ``--preprocess`` text that parses back to this (keys at their defaults left out)."""
        parts = []
        if self.resize is not None:
            parts.append(f"resize={self.resize if isinstance(self.resize, int) else '%dx%d' % self.resize}")
        if self.crop is not None:
            parts.append(f"crop={_size_text(self.crop)}")
        for key, default in (("scale", 1.0), ("mean", (0.0,)), ("std", (1.0,))):
            value = getattr(self, key)
            if value != default:
                parts.append(f"{key}={'/'.join(repr(v) for v in value) if isinstance(value, tuple) else repr(value)}")
        parts += [f"{k}={getattr(self, k)}" for k in ("layout", "color", "dtype", "labels")
                  if getattr(self, k) != Preprocess.__dataclass_fields__[k].default]
        return ",".join(parts)


def _size_text(size: Size) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def parse_preprocess(text: str, where: str = "--preprocess") -> Preprocess:
    """``resize=256,crop=224,scale=1/255,...`` into a Preprocess; a bad key or value is a one-line UsageError."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise UsageError(f"{where} '{text}': expected key=value pairs separated by ',', got '{item.strip()}'")
        if key in pairs:
            raise UsageError(f"{where}: '{key}' given twice")
        pairs[key] = value.strip()
    return preprocess_from_table(pairs, where)


def preprocess_from_table(table: Mapping[str, Any], where: str = "[preprocess]") -> Preprocess:
    """A Preprocess from a mapping of keys to values: strings as on the command line, or TOML numbers and lists
    (``mean = [0.485, 0.456, 0.406]``)."""
    values: dict[str, Any] = {}
    for key, raw in table.items():
        key = str(key).lower()
        if key not in KEYS:
            raise UsageError(f"{where}: unknown key '{key}'; keys: {', '.join(KEYS)}")
        try:
            values[key] = _PARSERS[key](raw)
        except (ValueError, TypeError, OverflowError, ZeroDivisionError):
            raise UsageError(f"{where}: {key}={_show(raw)}: expected {_EXPECTED[key]}") from None
    try:
        return Preprocess(**values)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def _show(raw: Any) -> str:
    return "/".join(str(v) for v in raw) if isinstance(raw, (list, tuple)) else str(raw)


def _int(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    n = int(raw.strip()) if isinstance(raw, str) else int(raw)
    if not 0 < n <= MAX_SIDE:
        raise ValueError(raw)
    return n


def _size(raw: Any) -> int | Size:
    """N or WxH (a TOML list [W, H] too)."""
    if isinstance(raw, (list, tuple)):
        if len(raw) != 2:
            raise ValueError(raw)
        return _int(raw[0]), _int(raw[1])
    if isinstance(raw, str) and "x" in raw.lower():
        w, _, h = raw.lower().partition("x")
        return _int(w), _int(h)
    return _int(raw)


def _crop(raw: Any) -> Size:
    size = _size(raw)
    return (size, size) if isinstance(size, int) else size


def _number(raw: Any) -> float:
    """A finite number, or a fraction a/b in a string."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, str) and "/" in raw:
        a, _, b = raw.partition("/")
        value = float(a) / float(b)
    else:
        value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _numbers(raw: Any) -> tuple[float, ...]:
    """One number or one per channel: 'a/b/c' or a TOML list."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split("/") if isinstance(raw, str) else [raw]
    if not items:
        raise ValueError(raw)
    out = []
    for v in items:
        if isinstance(v, bool):
            raise ValueError(raw)
        out.append(float(v))
    return tuple(out)


def _choice(key: str) -> Any:
    def parse(raw: Any) -> str:
        if not isinstance(raw, str) or raw.strip().lower() not in CHOICES[key]:
            raise ValueError(raw)
        return raw.strip().lower()
    return parse


_PARSERS: dict[str, Any] = {"resize": _size, "crop": _crop, "scale": _number, "mean": _numbers, "std": _numbers,
                            **{k: _choice(k) for k in CHOICES}}
_EXPECTED = {"resize": "N (the shorter side) or WxH, positive integers",
             "crop": "N or WxH (a centre crop), positive integers",
             "scale": "a positive number or a fraction a/b (e.g. 1/255)",
             "mean": "one number, or one per channel separated by '/'",
             "std": "one positive number, or one per channel separated by '/'",
             **{k: "|".join(v) for k, v in CHOICES.items()}}


def to_array(pixels: list[np.ndarray], pp: Preprocess, dtype: np.dtype[Any]) -> np.ndarray:
    """Steps 4-7: same-size uint8 images (H x W x C, or H x W for gray) as one batch array of ``dtype``."""
    x = np.stack(pixels)
    if x.ndim == 3:
        x = x[..., None]
    if pp.normalizes or dtype.kind == "f":
        x = x.astype(np.float32) * np.float32(pp.scale)
        x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    if pp.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=dtype)
