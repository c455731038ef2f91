"""Reading tensor bytes for the cleanup passes: streamed, sampled, hashed, compared.

External data is read from its file in chunks (never loaded whole, never memory-mapped); in-memory
tensors are read through a view where possible.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

_CHUNK = 16 << 20
#: Tensors up to this size are compared by their whole bytes; bigger ones by a sample, then a digest.
SMALL_BYTES = 64 << 10
_SAMPLE_BYTES = 4096


def tensor_chunks(tensor):
    """The tensor's bytes as stored, in chunks: external data is streamed from its file."""
    if isinstance(tensor, ir.ExternalTensor):
        remaining = tensor.length if tensor.length is not None else tensor.nbytes
        with open(tensor.path, "rb") as f:
            f.seek(tensor.offset or 0)
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{tensor.path}: ends early while reading tensor {tensor.name!r}")
                remaining -= len(chunk)
                yield chunk
    elif tensor.dtype == ir.DataType.STRING:
        for s in tensor.string_data():
            yield len(s).to_bytes(8, "little")
            yield s
    else:
        yield tensor.tobytes()


def digest(tensor) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for chunk in tensor_chunks(tensor):
        h.update(chunk)
    return h.digest()


def same_bytes(a, b) -> bool:
    """Byte-exact comparison of two tensors, chunk by chunk (never both loaded whole)."""
    buf_a, buf_b = bytearray(), bytearray()
    it_a, it_b = tensor_chunks(a), tensor_chunks(b)
    while True:
        while len(buf_a) < _CHUNK and (chunk := next(it_a, None)) is not None:
            buf_a += chunk
        while len(buf_b) < _CHUNK and (chunk := next(it_b, None)) is not None:
            buf_b += chunk
        n = min(len(buf_a), len(buf_b))
        if buf_a[:n] != buf_b[:n]:
            return False
        del buf_a[:n], buf_b[:n]
        if n == 0:
            return not buf_a and not buf_b


def sample(tensor) -> bytes | None:
    """A cheap fingerprint: the whole bytes of a small tensor, else 4 KiB from its start, middle and
    end (read from the file for external data, from a view otherwise). None for strings."""
    if tensor.dtype == ir.DataType.STRING:
        return None
    n = tensor.nbytes
    if n <= SMALL_BYTES:
        return tensor.tobytes()
    starts = (0, n // 2, n - _SAMPLE_BYTES)
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as f:
            parts = []
            for start in starts:
                f.seek((tensor.offset or 0) + start)
                parts.append(f.read(_SAMPLE_BYTES))
        return b"".join(parts)
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    return b"".join(flat[s:s + _SAMPLE_BYTES].tobytes() for s in starts)
