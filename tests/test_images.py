"""A folder of images as calibration/validation data: the preprocessing's exact values, the parser (generated
inputs), batches, labels from class folders, and the CLI end to end and its one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from graphopt.calibration import images
from graphopt.calibration.preprocess import Preprocess, parse_preprocess, preprocess_from_table
from graphopt.calibration.readers import ImageSource, model_inputs, open_source
from graphopt.errors import InputError, UsageError
from graphs import MODELS, assert_one_line_error, conv_model, make_model, node

Q = "quantize:objective=size"   # int8 wherever the targets hold, as these tests expect (objective=latency times it)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def one_batch(folder: Path, model: onnx.ModelProto, text: str | None) -> np.ndarray:
    src = open_source(folder, model, preprocess=text)
    return next(iter(src)).feed["x"]


def image_model(shape: list, channels_last: bool = False) -> onnx.ModelProto:
    """x[shape] -> ReduceMean over the image axes -> y: any image size goes through."""
    axes = [1, 2, 3] if len(shape) == 4 else [0, 1, 2]
    return make_model([node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=0)], [("x", shape)], ["y"], opset=17)


# ------------------------------------------------------------------------------------------- the math, exactly


@pytest.mark.parametrize("color", ["rgb", "bgr", "gray"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_values_through_resize_crop_scale_mean_std_layout_color(tmp_path, color, layout):
    px = rgb(4, 6)                       # 6 wide, 4 high: resize=4 (the shorter side) leaves it as it is
    save(tmp_path / "a.png", px)
    mean, std = ((0.5,), (0.25,)) if color == "gray" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    text = (f"resize=4,crop=4x2,scale=1/255,mean={'/'.join(map(str, mean))},std={'/'.join(map(str, std))},"
            f"layout={layout},color={color}")
    shape = [None, 1 if color == "gray" else 3, 2, 4] if layout == "nchw" else [None, 2, 4, 1 if color == "gray" else 3]
    got = one_batch(tmp_path, image_model(shape), text)
    by_hand = px.astype(np.int64)
    if color == "gray":  # Pillow's L = R*299/1000 + G*587/1000 + B*114/1000, in its fixed point (rounded)
        by_hand = (by_hand[..., :1] * 19595 + by_hand[..., 1:2] * 38470 + by_hand[..., 2:] * 7471 + 0x8000) >> 16
    if color == "bgr":
        by_hand = by_hand[..., ::-1]
    by_hand = by_hand[1:3, 1:5]          # centre crop 4x2 of 6x4: left round(2/2) = 1, top round(2/2) = 1
    want = (by_hand / 255 - np.array(mean)) / np.array(std)
    want = want.transpose(2, 0, 1)[None] if layout == "nchw" else want[None]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resize_shorter_side_is_pillows_bilinear(tmp_path):
    px = rgb(6, 10, seed=1)
    save(tmp_path / "a.png", px)
    got = one_batch(tmp_path, image_model([None, 3, None, None]), "resize=3")
    assert got.shape == (1, 3, 3, 5)     # the longer side 3 * 10 / 6 = 5
    pil = np.asarray(Image.fromarray(px).resize((5, 3), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(got[0], pil.transpose(2, 0, 1))
    const = tmp_path / "c"
    save(const / "c.png", np.full((7, 9, 3), 77, np.uint8))
    np.testing.assert_array_equal(one_batch(const, image_model([None, 3, None, None]), "resize=5x4"), 77.0)


def test_jpeg_and_dtype_of_the_input(tmp_path):
    save(tmp_path / "a.jpg", np.full((8, 8, 3), 128, np.uint8))
    x = one_batch(tmp_path, image_model([1, 8, 8, 3]), "layout=nhwc,scale=1/128")
    assert x.shape == (1, 8, 8, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0, atol=2 / 128)
    u8 = make_model([node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)], [("x", [1, 8, 8, 3], np.uint8)], ["y"])
    x = one_batch(tmp_path, u8, "layout=nhwc")   # raw pixels for a uint8 input: no float detour
    assert x.dtype == np.uint8


# -------------------------------------------------------------------------------------------------- the parser


sizes = st.integers(1, 4096)
numbers = st.floats(-10, 10, allow_nan=False)
positive = st.floats(0.001, 10)


@st.composite
def preprocesses(draw: st.DrawFn) -> Preprocess:
    color = draw(st.sampled_from(["rgb", "bgr", "gray"]))
    n = st.sampled_from([1, 1 if color == "gray" else 3])
    return Preprocess(resize=draw(st.none() | sizes | st.tuples(sizes, sizes)),
                      crop=draw(st.none() | st.tuples(sizes, sizes)), scale=draw(positive),
                      mean=tuple(draw(st.lists(numbers, min_size=(k := draw(n)), max_size=k))),
                      std=tuple(draw(st.lists(positive, min_size=(m := draw(n)), max_size=m))),
                      layout=draw(st.sampled_from(["nchw", "nhwc"])), color=color,
                      dtype=draw(st.sampled_from([None, "float32", "float16"])),
                      labels=draw(st.sampled_from(["none", "folders"])))


@settings(max_examples=200, deadline=None)
@given(preprocesses())
def test_what_str_says_parses_back(pp):
    assert parse_preprocess(str(pp) or "layout=nchw") == pp


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="resizcropmeanstdlayoutgrbhw=,/x0123456789.-_ ", max_size=40))
def test_any_text_parses_or_is_one_usage_line(text):
    try:
        parse_preprocess(text)
    except UsageError as e:
        assert len(str(e).splitlines()) == 1 and str(e).startswith("--preprocess")


@pytest.mark.parametrize("text, needle", [
    ("rezise=256", "unknown key 'rezise'"), ("resize=0", "resize=0: expected N"), ("crop=2x", "crop=2x"),
    ("scale=1/0", "scale=1/0"), ("scale=-1", "positive"), ("mean=0.5/0.5", "mean has 2 values"),
    ("color=gray,std=1/2/3", "std has 3 values but color=gray gives 1 channel"), ("std=0", "std positive"),
    ("layout=chw", "nchw|nhwc"), ("color=rgb,color=bgr", "given twice"), ("resize", "expected key=value"),
    ("labels=yes", "none|folders")])
def test_bad_keys_and_values(text, needle):
    with pytest.raises(UsageError, match=None) as e:
        parse_preprocess(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_recipe_table_takes_toml_values():
    pp = preprocess_from_table({"resize": 256, "crop": [224, 200], "scale": "1/255", "mean": [0.5, 0.4, 0.3],
                                "std": 0.2, "color": "BGR"})
    assert pp == Preprocess(resize=256, crop=(224, 200), scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2,),
                            color="bgr")
    with pytest.raises(UsageError, match="resize=True"):
        preprocess_from_table({"resize": True})


# ---------------------------------------------------------------------------------------- batches and labels


def test_batches_sorted_lazy_and_labelled_from_folders(tmp_path, monkeypatch):
    for i in range(20):
        save(tmp_path / ("cat" if i % 2 else "dog") / f"{i:02d}.png", np.full((5, 5, 3), i, np.uint8))
    model = image_model([None, 3, 5, 5])
    src = open_source(tmp_path, model, preprocess="labels=folders")
    decoded: list[str] = []
    real = ImageSource._decode
    monkeypatch.setattr(ImageSource, "_decode", lambda self, f: decoded.append(f.name) or real(self, f))
    it = iter(src)
    first = next(it)
    assert len(decoded) == 16                                   # one batch decoded, not the folder
    rest = list(it)
    assert [b.rows for b in [first, *rest]] == [16, 4]
    values = np.concatenate([b.feed["x"][:, 0, 0, 0] for b in [first, *rest]])
    np.testing.assert_array_equal(values, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18])
    np.testing.assert_array_equal(np.concatenate([first.labels, rest[0].labels]), [0] * 10 + [1] * 10)
    assert "2 class folders" in src.description
    assert len(src.warnings) == 1 and "whole numbers up to 19" in src.warnings[0]   # the checks of any data
    fixed = open_source(tmp_path, image_model([8, 3, 5, 5]), preprocess="scale=1/255", max_samples=19)
    assert [b.rows for b in fixed] == [8, 8] and "last 3 are left out" in fixed.warnings[1]
    assert "without labels" in fixed.warnings[0]


def test_no_batch_axis_and_mixed_sizes(tmp_path):
    save(tmp_path / "a.png", rgb(4, 4))
    save(tmp_path / "b.png", rgb(6, 4))
    save(tmp_path / "c.png", rgb(6, 4))
    feeds = list(open_source(tmp_path, image_model([3, None, None]), preprocess="scale=1/255"))
    assert [b.feed["x"].shape for b in feeds] == [(3, 4, 4), (3, 6, 4), (3, 6, 4)]
    batched = list(open_source(tmp_path, image_model([None, 3, None, None]), preprocess="scale=1/255"))
    assert [b.feed["x"].shape for b in batched] == [(1, 3, 4, 4), (2, 3, 6, 4)]   # one size per batch
    src = open_source(tmp_path, image_model([None, 3, None, None]))      # no --preprocess, no fixed size: raw
    assert any("raw RGB pixels" in w for w in src.warnings)


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """32 digits of mnist_calib.npz as 28x28 gray PNGs, 10 class folders."""
    folder = tmp_path_factory.mktemp("digits")
    with np.load(MODELS / "mnist_calib.npz") as z:
        x, y = z["input"], z["__labels__"]
    picked = [i for c in range(10) for i in np.flatnonzero(y == c)[:4 if c < 2 else 3]]
    for i in picked:
        save(folder / str(y[i]) / f"{i:03d}.png", np.round(x[i, 0] * 255).astype(np.uint8))
    return folder


def test_quantize_calibrated_on_a_folder_of_digits(cli, tmp_path, digits):
    res = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o.onnx", "--pass", Q, "--calib-data", digits,
              "--preprocess", "resize=28,color=gray,scale=1/255", "--val-data", MODELS / "mnist_eval.npz",
              "--latency-runs", "0")
    assert res.code == 0, res.err
    assert "calibration samples 32" in res.out and "PASSED" in res.out
    line = next(line for line in res.out.splitlines() if "accuracy on labels" in line)
    before, after = (float(v.strip().rstrip("%")) for v in line.split(":")[1].split("(")[0].split("->"))
    assert before > 97 and after > before - 1, line


def test_recipe_preprocess_and_folder_labels(cli, tmp_path, digits):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-bn"\n\n[preprocess]\nresize = 28\ncolor = "gray"\nscale = "1/255"\n'
                      'labels = "folders"\n')
    res = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o.onnx", "--recipe", recipe, "--val-data", digits,
              "--latency-runs", "0")
    assert res.code == 0, res.err
    assert "digits" in res.out and "10 class folders" in res.out and "accuracy on labels (32 samples)" in res.out
    both = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o2.onnx", "--recipe", recipe, "--val-data", digits,
               "--preprocess", "color=gray")
    assert_one_line_error(both, 2, "not both")


@pytest.mark.parametrize("extra, needles", [
    ((), ["state the model's preprocessing once with --preprocess", "resize=28,crop=28,scale=1/255,color=gray"]),
    (("--preprocess", "resize=32,color=gray"), ["input 'input' expects 1x28x28 (NCHW); --preprocess gives 1x32x32",
                                                "add crop=28"]),
    (("--preprocess", "resize=28"), ["expects 1x28x28", "color=rgb", "add color=gray"]),
    (("--preprocess", "resize=28,color=gray,crop=30"), ["(28x28) is 28x28 after resize, smaller than crop=30"]),
    (("--preprocess", "resize=28,colour=gray"), ["unknown key 'colour'"]),
])
def test_refusals_are_one_line(cli, tmp_path, digits, extra, needles):
    res = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o.onnx", "--val-data", digits, *extra)
    assert_one_line_error(res, 2, *needles)
    assert not (tmp_path / "o.onnx").exists()


def test_unreadable_file_unused_flag_and_no_pillow(cli, tmp_path, digits, monkeypatch):
    model = tmp_path / "in.onnx"
    onnx.save(conv_model(), model)
    bad = tmp_path / "bad"
    save(bad / "a.png", rgb(8, 8))
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    res = cli(model, tmp_path / "o.onnx", "--val-data", bad, "--preprocess", "scale=1/255")
    assert_one_line_error(res, 2, "b.jpg: not a readable image")
    res = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o.onnx", "--val-data", MODELS / "mnist_eval.npz",
              "--preprocess", "scale=1/255")
    assert_one_line_error(res, 2, "--preprocess applies to a folder of images")
    with pytest.raises(InputError, match="one image input"):
        ImageSource(bad, model_inputs(make_model([node("Add", ["a", "b"], ["y"])], [("a", [1, 3, 8, 8]),
                                                                                   ("b", [1, 3, 8, 8])], ["y"])))
    monkeypatch.setattr(images, "HAVE_PILLOW", False)
    res = cli(MODELS / "mnist_cnn.onnx", tmp_path / "o.onnx", "--val-data", digits, "--preprocess", "color=gray")
    assert_one_line_error(res, 2, "reading images needs Pillow: pip install 'graphopt[images]'")
