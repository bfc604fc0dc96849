"""Reading and writing models and data files: the only module that touches the file system for graphopt.

Loading refuses what would be unsafe or unsupported, with a one-line reason:
  * not a file, empty, not a protobuf ModelProto, or a ModelProto that fails ``onnx.checker``;
  * IR or ai.onnx opset versions outside what the installed onnx understands;
  * external-data locations that resolve outside the model's folder (absolute paths, ``..``, symlinks out of the
    folder) — reading them would let a model file make the loader read arbitrary files — or that are missing.
Saving is atomic: the bytes go to a temporary file in OUT's folder which is renamed over OUT only when complete, so
an error or Ctrl-C never leaves a partial OUT. Models whose protobuf would exceed 2 GB are saved with their tensors
in one external-data file beside OUT (``OUT.data``), moved into place before OUT itself.

Models over the protobuf limit (``PROTOBUF_LIMIT``, read at call time so tests can lower it) are never serialized
whole, and their weights are never all in memory: ``load_model`` leaves them in the input's files (file-held
tensors, ``graphopt.tensor_data``; ``graph.import_graph`` reads each one when a pass asks for it, with
``external_data.read_tensor``). ``is_big`` tells such a model (over the limit by its tensors' dims, or holding tensors in files);
it is checked by path (``onnx.checker`` on the file; after a pass, on the model written without data beside a
sparse data file); ``write_external`` writes it with its tensors of 1 KiB or more in one data file, tensor by
tensor, file-held ones copied file to file (``graphopt.external_data``); ``temporary_external`` writes it to a
temporary folder for onnxruntime, with the source files hard-linked there rather than copied;
``model_size_bytes`` counts what ``save_model`` writes without writing it. The input's files are only read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import InputError, OutputError, one_line
from .external_data import Linker, copy_tensor, hold_in_files, sparse_file
from .tensor_data import DataFile, all_tensors, data_bytes, detached, file_location

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PROTOBUF_LIMIT = 2**31 - 1
# Stay clear of the hard limit: serialisation also needs room for the graph structure and field headers.
HEADROOM = 2**24
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24
MIN_OPSET = 7


def external_data_files(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Resolved paths of the external-data files a model refers to, after checking each location is safe."""
    base = base_dir.resolve()
    files: list[Path] = []
    for tensor in all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        if not location:
            raise InputError(f"tensor '{tensor.name}' uses external data but names no location")
        if os.path.isabs(location) or Path(location).drive:
            raise InputError(f"tensor '{tensor.name}': external-data location '{location}' is an absolute path; "
                             "only files inside the model's folder are read")
        target = (base / location).resolve()
        if target != base and base not in target.parents:
            raise InputError(f"tensor '{tensor.name}': external-data location '{location}' resolves outside "
                             f"the model's folder ({target}); refusing to read it")
        if not target.is_file():
            raise InputError(f"external-data file '{location}' (tensor '{tensor.name}') not found next to the model")
        if target not in files:
            files.append(target)
    return files


def _check_versions(model: onnx.ModelProto, where: str) -> None:
    if model.ir_version < 3:
        raise InputError(f"{where}: IR version {model.ir_version} is not supported (need 3 or newer)")
    if model.ir_version > onnx.IR_VERSION:
        raise InputError(f"{where}: IR version {model.ir_version} is newer than the installed onnx "
                         f"{onnx.__version__} understands (up to {onnx.IR_VERSION})")
    max_opset = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version < MIN_OPSET or opset.version > max_opset:
                raise InputError(f"{where}: ai.onnx opset {opset.version} is not supported "
                                 f"(graphopt handles opsets {MIN_OPSET} to {max_opset})")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read, check and return a model with its external data loaded; raise InputError with the reason if not."""
    return load_model_and_files(path)[0]


def load_model_and_files(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, list[Path]]:
    """Like load_model, also returning every file the model was read from (itself and its external data)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX model file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty")
    try:
        with open(p, "rb") as f:
            model = onnx.load_model_from_string(f.read())
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or one_line(e)}") from e
    except Exception as e:  # protobuf DecodeError and friends
        raise InputError(f"{p}: not an ONNX model (the file does not parse as an ONNX protobuf)") from e
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{p}: not an ONNX model (no graph inside; is it truncated or another file type?)")
    if not model.opset_import:
        raise InputError(f"{p}: not a usable ONNX model (no opset_import; is it truncated?)")
    _check_versions(model, str(p))
    files = [p, *external_data_files(model, p.parent)]
    big = len(files) > 1 and tensor_bytes(model, external=True) >= _big_threshold()
    if big:     # checked as it is on disk; its weights stay in their files (read one at a time by the passes)
        _check_path(p, str(p))
        hold_in_files(all_tensors(model), p.parent, str(p))
        return model, files
    try:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise InputError(f"{p}: cannot load external data: {one_line(e)}") from e
    check_model(model, str(p))
    return model, files


def _big_threshold() -> int:
    """Size from which a model's protobuf is treated as over the limit (read at call time: tests lower it)."""
    return min(EXTERNAL_DATA_THRESHOLD, PROTOBUF_LIMIT - min(HEADROOM, PROTOBUF_LIMIT // 8))


def tensor_bytes(model: onnx.ModelProto, *, external: bool = False) -> int:
    """Bytes of the tensor data the model holds in its protobuf (with ``external``, in external files too)."""
    return sum(data_bytes(t) for t in all_tensors(model)
               if external or not external_data_helper.uses_external_data(t))


def is_big(model: onnx.ModelProto) -> bool:
    """Would the model's protobuf reach the limit? Told from its tensors, serializing it only when they leave room
    for the rest (then it is safe). A model holding tensors in files (as ``load_model`` holds a big one) is."""
    if any(file_location(t) is not None for t in all_tensors(model)):
        return True
    limit = _big_threshold()
    data = tensor_bytes(model)
    return data >= limit or (data >= limit // 2 and model.ByteSize() >= limit)


def check_model(model: onnx.ModelProto, where: str) -> None:
    """``onnx.checker`` on a model, turning failures into a one-line InputError. A model over the protobuf limit is
    written with its tensors external to a temporary folder and checked by path."""
    if is_big(model):   # written without its data, beside a sparse data file of the right size
        folder = Path(tempfile.mkdtemp(prefix="graphopt-check-"))
        try:
            data = DataFile(None)
            (folder / "model.onnx").write_bytes(detached(model, data).SerializeToString())
            sparse_file(folder / data.location, data.size)
            _check_path(folder / "model.onnx", where)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise InputError(f"{where}: invalid ONNX model: {one_line(e)}") from e


def _check_path(path: Path, where: str) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise InputError(f"{where}: invalid ONNX model: {one_line(e)}") from e


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Size of the model as ``save_model`` writes it (protobuf plus any external data), without writing it."""
    if not is_big(model):
        return model.ByteSize()
    data = DataFile(None)
    return detached(model, data).ByteSize() + data.size


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_path(out: str | os.PathLike[str], protected: list[Path] | None = None) -> Path:
    """Refuse an OUT that cannot be written or would overwrite one of ``protected`` (the input and its data)."""
    o = Path(out)
    if o.name in ("", ".", ".."):
        raise OutputError(f"{o}: output must be a file path")
    if o.exists() and o.is_dir():
        raise OutputError(f"{o}: output is a directory; give a file path")
    folder = o.parent if str(o.parent) else Path(".")
    if not folder.exists():
        raise OutputError(f"{o}: output folder '{folder}' does not exist")
    if not folder.is_dir():
        raise OutputError(f"{o}: '{folder}' is not a folder")
    for p in protected or []:
        for candidate in (o, o.with_name(o.name + ".data")):
            if candidate.resolve() == p.resolve() or _same_file(candidate, p):
                raise OutputError(f"{o}: writing here would overwrite the input file {p}; choose another output path")
    # A real probe: os.access() says yes to root even on read-only mounts.
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{o.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{o}: output folder '{folder}' is not writable ({e.strerror})") from e
    return o


def _open_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (read with a set-and-restore)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename tmp over ``path``; the temporary file never outlives a failure. The
    file gets the mode ``open()`` would give it (mkstemp makes it 0600: unreadable to a serving process running as
    another user)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, _open_mode())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_model(model: onnx.ModelProto, out: str | os.PathLike[str]) -> list[Path]:
    """Atomically write ``model`` to ``out`` (with ``out.data`` when over 2 GB); return the paths written."""
    o = Path(out)
    try:
        if not is_big(model):
            data = model.SerializeToString()
            _write_atomic(o, lambda tmp: tmp.write_bytes(data))
            return [o]
        return _save_external(model, o)
    except OSError as e:
        raise OutputError(f"{o}: cannot write output: {e.strerror or one_line(e)}") from e


def _save_external(model: onnx.ModelProto, o: Path) -> list[Path]:
    data_name = o.name + ".data"
    work = Path(tempfile.mkdtemp(prefix=f".{o.name}.", dir=o.parent))
    try:
        write_external(model, work / o.name, data_name)
        os.replace(work / data_name, o.parent / data_name)
        os.replace(work / o.name, o)
        return [o, o.parent / data_name]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def data_free_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every tensor of 1 KiB or more marked external and no data (nothing is written): for
    what needs the graph, types and dims but not the weights, such as shape inference of a big model."""
    return detached(model, DataFile(None))


def write_external(model: onnx.ModelProto, path: Path, data_name: str | None = None,
                   edit: Callable[[onnx.ModelProto], None] | None = None, link: bool = False) -> list[Path]:
    """Write ``model`` to ``path`` with its tensors in ``data_name`` beside it (``PATH.data`` by default), not
    atomically (see ``save_model``); ``edit`` may change the written copy (not the model) before it is saved.
    File-held tensors are copied into the data file, or with ``link`` refer to their files linked beside ``path``
    (a temporary model: the folder then holds those links too)."""
    data_name = data_name or path.name + ".data"
    with open(path.parent / data_name, "wb") as f:
        skeleton = detached(model, DataFile(f, data_name, copy=copy_tensor,
                                            keep=Linker(path.parent) if link else None))
    if edit is not None:
        edit(skeleton)
    path.write_bytes(skeleton.SerializeToString())
    return [path, path.parent / data_name]


@contextmanager
def temporary_external(model: onnx.ModelProto, edit: Callable[[onnx.ModelProto], None] | None = None
                       ) -> Iterator[Path]:
    """The model written with external data (``write_external``, its files linked) in a temporary folder, removed
    afterwards; yields the model's path (for onnxruntime)."""
    folder = Path(tempfile.mkdtemp(prefix="graphopt-"))
    try:
        yield write_external(model, folder / "model.onnx", edit=edit, link=True)[0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_bytes(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write ``text`` (UTF-8)."""
    write_bytes(path, text.encode())


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` (a report, a CSV table, a PNG image)."""
    p = Path(path)
    try:
        _write_atomic(p, lambda tmp: tmp.write_bytes(data))
    except OSError as e:
        raise OutputError(f"{p}: cannot write: {e.strerror or one_line(e)}") from e


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or one_line(e)}") from e
    except ValueError as e:
        raise InputError(f"{p}: not valid JSON: {one_line(e)}") from e


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or one_line(e)}") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: not valid TOML: {one_line(e)}") from e


def open_npz(path: str | os.PathLike[str]) -> Any:
    """Open an ``.npz`` lazily (arrays are read on access) with pickles refused."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such .npz file")
    try:
        return np.load(p, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{p}: not a readable .npz file: {one_line(e)}") from e
