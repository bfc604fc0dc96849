"""graphopt.io writes files as ``open()`` would make them: the mode is 0666 less the umask, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt import io
from graphs import parse_model


@settings(max_examples=12, deadline=None)
@given(umask=st.integers(0, 0o777))
def test_written_files_get_the_mode_open_gives(tmp_path_factory, umask: int):
    folder: Path = tmp_path_factory.mktemp("out")
    old = os.umask(umask)
    try:
        io.save_model(parse_model("graph (float[2] x) => (float[2] y) { y = Neg(x) }"), folder / "m.onnx")
        io.write_json(folder / "r.json", {"a": 1})
        with open(folder / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((folder / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("m.onnx", "r.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == expected, name
