"""ONNX Runtime sessions and model inputs, shared by validation, benchmarking and calibration.

Sessions are opened by path when the model is on disk (weights never pass through Python); an
in-memory ``ir.Model`` is serialized to bytes, or saved to a temporary folder with external data when
it is too big for one protobuf.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from onnxshrink import model_io
from onnxshrink.errors import DataError, RuntimeFailure

logger = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}

def ort():
    import onnxruntime

    return onnxruntime


def resolve_providers(providers) -> list[str]:
    """Map ``cpu``/``cuda``/``tensorrt`` (or full names) to ONNX Runtime provider names."""
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    return [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in providers]


def available_providers() -> list[str]:
    return list(ort().get_available_providers())


def session_options(threads: int | None = None, optimized_path: str | None = None, level=None):
    so = ort().SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return so


#: Session setting: the folder that relative external-data paths of a model given as bytes resolve in.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


#: An in-memory model holding more tensor bytes than this goes to ONNX Runtime through a temporary
#: file with external data (tensors written one at a time), not as serialized bytes (two more copies).
INLINE_SESSION_BYTES = 256 << 20


@contextlib.contextmanager
def model_path(model: ir.Model | str | os.PathLike, external_data: bool | None = None):
    """A path ONNX Runtime can open: the file itself, or a temporary copy of an in-memory model
    (``external_data``: as ``model_io.save``)."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model)
        return
    tmp = tempfile.mkdtemp(prefix="onnxshrink-rt-")
    try:
        yield str(model_io.save(model, Path(tmp) / "model.onnx", external_data=external_data))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_session(
    model: ir.Model | str | os.PathLike | bytes,
    providers=None,
    *,
    threads: int | None = None,
    options=None,
):
    """An ``InferenceSession`` for a path, serialized bytes or an in-memory model.

    An in-memory model goes as bytes when what it holds in memory is small (under
    :data:`INLINE_SESSION_BYTES`); tensors it reads from one folder of external data stay references,
    resolved through ONNX Runtime's external-folder setting (bytes alone resolve them against the
    working directory). Otherwise it is saved to a temporary file first, with external data when it
    holds that much."""
    rt = ort()
    so = options or session_options(threads)
    provs = resolve_providers(providers)
    try:
        if isinstance(model, ir.Model):
            tensors = list(model_io.iter_initializer_tensors(model))
            folders = {str(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor)}
            inline = sum(t.nbytes for t in tensors if not isinstance(t, ir.ExternalTensor))
            if len(folders) <= 1 and inline < INLINE_SESSION_BYTES:
                if folders:
                    so.add_session_config_entry(EXTERNAL_FOLDER_KEY, next(iter(folders)))
                return rt.InferenceSession(model_io.to_bytes(model), so, providers=provs)
            with model_path(model, external_data=inline >= INLINE_SESSION_BYTES or None) as p:
                return rt.InferenceSession(p, so, providers=provs)
        if isinstance(model, (bytes, bytearray)):
            return rt.InferenceSession(bytes(model), so, providers=provs)
        return rt.InferenceSession(str(model), so, providers=provs)
    except Exception as e:
        raise RuntimeFailure(f"ONNX Runtime could not load the model: {e}") from e


def parse_dims(specs) -> dict[str, int]:
    """Parse ``--shape`` values like ``batch=4`` or ``input:0=4`` into a dims mapping."""
    dims: dict[str, int] = {}
    for spec in specs or []:
        for part in re.split(r"[,\s]+", spec.strip()):
            if not part:
                continue
            key, sep, val = part.rpartition("=")
            if not sep or not key or not val.isdigit():
                raise DataError(f"bad --shape {part!r}: write DIM=SIZE, for example batch=8")
            dims[key] = int(val)
    return dims
