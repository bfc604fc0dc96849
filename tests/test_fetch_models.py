"""benchmarks/fetch_models.py's Magika data, without the network: the feature extraction ported from magika.py and
the calib/eval split by groups of possibly near-duplicate files."""

from __future__ import annotations

from typing import Any

import pytest
from bench_support import load_benchmark


@pytest.fixture(scope="module")
def fm() -> Any:
    return load_benchmark("fetch_models")


# magika's config.min.json shrunk: 4 bytes from each end, out of at most 8 read, 3 needed
CFG = {"beg_size": 4, "end_size": 4, "block_size": 8, "padding_token": 256, "min_file_size_for_dl": 3}
PAD = 256


@pytest.mark.parametrize("data, expected", [
    # 8 bytes read from each end, stripped, first / last 4 kept
    (b"  abcdefghij  ", list(b"abcd") + list(b"ghij")),
    # shorter than beg_size after the strip: padded on the right (beg) and on the left (end)
    (b"\n ab \n", list(b"ab \n") + list(b"\n ab")),
    (b"abc", list(b"abc") + [PAD] + [PAD] + list(b"abc")),
    # whitespace is stripped only towards the outside: inner spaces count
    (b"   a   ", list(b"a   ") + list(b"   a")),
])
def test_magika_features(fm: Any, data: bytes, expected: list[int]) -> None:
    assert fm.magika_features(data, CFG) == expected


@pytest.mark.parametrize("data", [b"", b"ab", b"     ab", b"\t\t\t\t\t\t\t\t\t\t"])
def test_magika_features_none_where_magika_skips_the_model(fm: Any, data: bytes) -> None:
    # under min_file_size_for_dl bytes, or the min_file_size_for_dl-th byte after lstrip() is padding
    assert fm.magika_features(data, CFG) is None


def test_file_group(fm: Any) -> None:
    g = fm._file_group
    assert g("pillow", "p/Tests/images/hopper.png") == g("pillow", "p/Tests/images/hopper_bw_500.png")
    assert g("ocrmypdf", "o/docs/releasenotes/version16.md") == g("ocrmypdf", "o/docs/releasenotes/version17.md")
    assert g("pillow", "p/Tests/images/hopper.png") != g("pillow", "p/Tests/images/apng/hopper.png")
    assert g("pillow", "p/a/x.png") != g("pygments", "p/a/x.png")


def test_split_groups(fm: Any) -> None:
    groups = [[0, 1, 2, 3, 4], [5], [6], [7, 8]]
    cal, ev = fm._split_groups(groups, 3)
    assert (cal, ev) == ([0, 6, 1], [7, 5, 8])  # largest first, to the emptier split; round-robin within a split
    for g in groups:  # a group never straddles the splits
        assert not (set(g) & set(cal) and set(g) & set(ev))
