"""Model I/O: load from a path, bytes or proto into ``onnx_ir``; save atomically, external data when needed.

Weights stay memory-mapped: ``onnx_ir`` loads external tensors lazily, and saving streams them out. Raw
protos only cross this boundary.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxshrink.errors import ModelLoadError, OutputError, UnsupportedModelError

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model

MIN_IR_VERSION = 3
MAX_IR_VERSION = onnx.IR_VERSION
MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
#: Above this many initializer bytes a model is written with external data (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: ``model.meta`` key set by :func:`load` on a model that kept weights in external data: :func:`save`
#: keeps that format even when every external tensor was replaced (pruned, quantized), which would
#: otherwise write a large model as one protobuf, with two more copies of its weights in memory.
KEEP_EXTERNAL = "onnxshrink.external_data"
#: Tensors at least this big go to the external data file when one is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load(source: ModelSource, *, check_support: bool = True) -> ir.Model:
    """Load a model from a path, serialized bytes, an ``onnx.ModelProto`` or an ``ir.Model``.

    Raises ``ModelLoadError`` for unreadable input and ``UnsupportedModelError`` for IR or opset
    versions outside ``[MIN, MAX]``. An ``ir.Model`` is returned as is (not copied).
    """
    if isinstance(source, ir.Model):
        model = source
    elif isinstance(source, onnx.ModelProto):
        _check_proto_sane(source, "<ModelProto>")
        model = ir.serde.deserialize_model(_densified(source, "<ModelProto>"))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model = _load_bytes(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
    else:
        raise ModelLoadError(
            f"cannot load a model from {type(source).__name__}; pass a path, bytes, "
            "onnx.ModelProto or onnx_ir.Model"
        )
    if check_support:
        check_supported(model)
    if uses_external_data(model):
        model.meta[KEEP_EXTERNAL] = True
    return model


def _load_bytes(data: bytes) -> ir.Model:
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"the bytes given are not an ONNX model or are truncated ({len(data)} bytes): {e}"
        ) from e
    _check_proto_sane(proto, "<bytes>")
    return ir.serde.deserialize_model(_densified(proto, "<bytes>"))


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelLoadError(
            f"{path}: not an ONNX model, or the file is truncated or corrupt ({e}). "
            "Re-export the model or check the copy."
        ) from e
    _check_proto_sane(proto, str(path))
    model = ir.serde.deserialize_model(_densified(proto, str(path)))
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, path)
    return model


def _check_proto_sane(proto: onnx.ModelProto, where: str) -> None:
    """Reject protobufs that parsed but are not models (random bytes can parse as an empty message)."""
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(
            f"{where}: not an ONNX model (no IR version, graph or opset import found); the file "
            "may be truncated or of another format"
        )
    if len(proto.graph.output) == 0:
        raise ModelLoadError(f"{where}: the graph has no outputs; the file may be truncated")


def _densified(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """``proto`` with its sparse initializers stored dense (a copy; the IR drops sparse initializers, and
    a model written without them does not load). Sparse initializers in subgraphs are refused."""
    if any(len(g.sparse_initializer) for g in proto_graphs(proto.graph) if g is not proto.graph):
        raise UnsupportedModelError(f"{where}: sparse initializers inside If/Loop/Scan bodies are not supported")
    if not proto.graph.sparse_initializer:
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for sp in out.graph.sparse_initializer:
        values, idx = onnx.numpy_helper.to_array(sp.values), onnx.numpy_helper.to_array(sp.indices)
        dims = tuple(sp.dims)
        dense = np.zeros(int(np.prod(dims)), values.dtype)
        dense[idx if idx.ndim == 1 else np.ravel_multi_index(tuple(idx.T), dims)] = values
        out.graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(dims), sp.values.name))
    logger.warning("%s: %d sparse initializers stored dense (%s)", where, len(out.graph.sparse_initializer),
                   ", ".join(sp.values.name for sp in out.graph.sparse_initializer[:5]))
    del out.graph.sparse_initializer[:]
    return out


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor's file must exist and be long enough for its offset and length."""
    sizes: dict[str, int] = {}
    for tensor in iter_initializer_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = os.path.join(tensor.base_dir, tensor.location)
        if file not in sizes:
            if not os.path.isfile(file):
                raise ModelLoadError(
                    f"{path}: tensor {tensor.name!r} stores its data in {tensor.location!r}, which "
                    f"is missing (looked in {tensor.base_dir}); keep the .data file next to the model"
                )
            sizes[file] = os.path.getsize(file)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file]:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} needs bytes up to {end} of {tensor.location!r}, "
                f"which has only {sizes[file]}; the external data file is truncated"
            )


def check_supported(model: ir.Model) -> None:
    """Raise ``UnsupportedModelError`` when the IR version or default-domain opset is out of range."""
    if not MIN_IR_VERSION <= model.ir_version <= MAX_IR_VERSION:
        raise UnsupportedModelError(
            f"IR version {model.ir_version} is not supported (supported: {MIN_IR_VERSION}-"
            f"{MAX_IR_VERSION}); convert the model with onnx.version_converter or upgrade onnx"
        )
    opset = default_opset(model)
    if opset is None:
        return  # only custom domains; passes skip what they do not understand
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"opset {opset} of the default ONNX domain is not supported (supported: {MIN_OPSET}-"
            f"{MAX_OPSET}); convert it with onnx.version_converter.convert_version"
        )


def default_opset(model: ir.Model) -> int | None:
    """Opset version of the default domain (``""`` or ``ai.onnx``), or None."""
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def upgrade_opset(model: ir.Model, target: int, why: str) -> tuple[ir.Model, int | None]:
    """``model`` converted to default-domain opset ``target`` by ``onnx.version_converter`` when its
    opset is lower (``why``: what needs ``target``, for the log and the error).

    Returns ``(model, old_opset)``; ``old_opset`` is None when nothing changed. External weights keep
    their base directory. Raises ``UnsupportedModelError`` when the converter cannot convert the model.
    """
    old = default_opset(model)
    if old is None or old >= target:
        return model, None
    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), target)
    except Exception as e:
        raise UnsupportedModelError(
            f"the model has opset {old}; {why} needs opset {target} and onnx.version_converter could "
            f"not convert it: {e}. Re-export the model with opset >= {target}"
        ) from e
    logger.info("upgraded the model from opset %d to %d for %s", old, target, why)
    upgraded = ir.serde.deserialize_model(proto)
    for g_old, g_new in zip(model.graphs(), upgraded.graphs()):
        base = None
        for t in g_old.initializers.values():
            if isinstance(t.const_value, ir.ExternalTensor):
                base = t.const_value.base_dir
                break
        if base:
            ir.external_data.set_base_dir(g_new, base)
    return upgraded, old


def iter_initializer_tensors(model: ir.Model):
    """Every initializer tensor of every graph (subgraphs included) and function."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def initializer_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in iter_initializer_tensors(model))


def uses_external_data(model: ir.Model) -> bool:
    return any(isinstance(t, ir.ExternalTensor) for t in iter_initializer_tensors(model))


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    overwrite_input: bool = False,
    protected: tuple[str | os.PathLike, ...] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temp files in the same folder, then rename).

    ``external_data``: None decides by size (over ``EXTERNAL_DATA_THRESHOLD``) or keeps the input's
    choice when it used external data (:data:`KEEP_EXTERNAL`, set by :func:`load`). ``protected``
    paths (the input) are never overwritten unless ``overwrite_input``. Returns the path written.
    """
    out = Path(path)
    _check_writable(out, protected, overwrite_input)
    if external_data is None:
        external_data = (uses_external_data(model) or bool(model.meta.get(KEEP_EXTERNAL))
                         or initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD)
    data_name = out.name + ".data"
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxshrink-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"{out}: cannot create files in {out.parent}: {e}") from e
    try:
        tmp_model = tmp_dir / out.name
        if external_data:
            ir.save(
                model,
                tmp_model,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            ir.save(model, tmp_model)
        if external_data:
            os.replace(tmp_dir / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    except OSError as e:
        raise OutputError(f"{out}: could not write the model: {e}") from e
    except ValueError as e:
        raise OutputError(f"{out}: could not serialize the model: {e}") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s%s", out, " with external data" if external_data else "")
    return out


def check_output(path: str | os.PathLike | None, *, protected=(), overwrite_input: bool = False) -> None:
    """Raise ``OutputError`` now if ``save`` would refuse ``path`` later (missing or read-only folder, a
    directory, the input without ``overwrite_input``): long jobs call it before they start, so a
    typo in ``-o`` does not cost a calibration or a reconstruction. None: nothing to check."""
    if path is not None:
        _check_writable(Path(path), protected, overwrite_input)


def _check_writable(out: Path, protected, overwrite_input: bool) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the folder {parent} is not writable")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name ending in .onnx")
    if out.exists() and not overwrite_input:
        for p in protected:
            if p is not None and Path(p).exists() and os.path.samefile(out, p):
                raise OutputError(
                    f"{out}: this is the input model; choose another output path or pass "
                    "--overwrite-input (overwrite_input=True)"
                )
    _check_input_data(out, protected, overwrite_input)


def _check_input_data(out: Path, protected, overwrite_input: bool) -> None:
    """Refuse an output, or the ``.data`` file written beside it, that is an input's external-data file:
    rewriting it would silently change what the input model computes."""
    ours = [f for f in (out, out.parent / (out.name + ".data")) if f.exists()]
    if not ours:
        return
    for p in protected:
        if p is None or not Path(p).is_file():
            continue
        if overwrite_input and out.exists() and os.path.samefile(out, p):
            continue  # the input itself, replaced as asked: its data file goes with it
        for data in external_data_files(p):
            hit = next((f for f in ours if os.path.samefile(f, data)), None)
            if hit is not None:
                raise OutputError(f"{out}: writing it would overwrite {hit}, the external-data file of the input "
                                  f"model {p}; choose another output name")


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files the model at ``path`` references (that exist)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable model: it has no data files to protect
        return []
    found = {path.parent / e.value for t in _all_proto_tensors(proto.graph)
             if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"}
    return [f for f in found if f.exists()]


def to_bytes(model: ir.Model) -> bytes:
    """Serialize a model held fully in memory (under 2 GiB)."""
    return ir.serde.serialize_model(model).SerializeToString()


def file_size(path: str | os.PathLike) -> int:
    """Size on disk of a model file plus the external data files it references."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path))


def proto_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph (If/Loop/Scan bodies) inside it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield from proto_graphs(g)


def _all_proto_tensors(graph: onnx.GraphProto):
    for g in proto_graphs(graph):
        yield from g.initializer
