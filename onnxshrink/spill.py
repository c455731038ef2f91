"""Large arrays moved out of anonymous memory: written to an unlinked temporary file and mapped back.

Reconstruction writes a new weight for every layer it refits, and quantization an int8 weight for
every layer it quantizes, in every candidate model it builds; they stay in the model until it is
saved: on a model of several GiB they add up to about the output's size. In anonymous memory (no swap
on many machines) that is a hard floor under the peak. Mapped from a file, the pages are the kernel's
to write back and drop under pressure, and the process's anonymous memory holds one weight at a time.
``benchmarks/bench_prune_memory.py`` and ``bench_quantize_memory.py`` measure it.

The file lives in the temporary directory (``TMPDIR``, like ``segments``' frontier) and is unlinked
from the start: nothing is left behind whatever happens, and the mappings keep it alive as long as a
tensor uses them (the returned arrays are ``np.memmap``; ``onnx_ir`` keeps them as they are). Where
the file cannot be made or grown (no temporary directory, a full disk), the arrays stay in memory,
with a warning: the job goes on as it did before spilling.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Arrays below this stay in memory: the mappings are not worth it, and the count of mappings (one per
#: array; Linux allows about 65,000 a process) stays under total bytes / MIN_BYTES.
MIN_BYTES = 1 << 20
_ALIGN = 4096


class Spill:
    """``spill(array)``: ``array`` itself when small, else a read-write memory-mapped copy of it."""

    def __init__(self, min_bytes: int | None = None, directory: str | os.PathLike | None = None) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.directory = directory
        self._file = None
        self._end = 0
        self.bytes = 0  # what went to the file
        self.failed: str | None = None  # why the file could not take more (then arrays stay in memory)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.nbytes < self.min_bytes or array.dtype.hasobject or self.failed:
            return array
        offset = -(-self._end // _ALIGN) * _ALIGN
        try:
            if self._file is None:
                # held across calls and closed by close(): no context manager fits
                self._file = tempfile.TemporaryFile(prefix="onnxshrink-spill-", dir=self.directory)  # noqa: SIM115
            # reserve the blocks first: a write through a mapping into a sparse file on a full disk is
            # a SIGBUS that kills the process, where this is an OSError
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._file.fileno(), offset, array.nbytes)
            else:  # macOS, Windows: no reservation, the file is only grown
                os.ftruncate(self._file.fileno(), offset + array.nbytes)
        except OSError as e:
            self.failed = f"{e.strerror or e} ({self.directory or tempfile.gettempdir()})"
            logger.warning("large arrays stay in memory: the temporary file for them failed: %s", self.failed)
            return array
        self._end = offset + array.nbytes
        mapped = np.memmap(self._file, dtype=array.dtype, mode="r+", offset=offset, shape=array.shape)
        mapped[...] = array
        self.bytes += array.nbytes
        return mapped

    def close(self) -> None:
        """Close the file; arrays already mapped stay valid (each mapping holds the file open)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Spill:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spill_initializers(model: ir.Model) -> int:
    """Move ``model``'s in-memory initializers of ``MIN_BYTES`` or more (``ir.Tensor`` over a numpy
    array: what the passes write, e.g. int8 weights) to a spill file of their own, which lives as long
    as the model does; returns the bytes moved. Tensors read from files stay as they are."""
    with Spill() as spill:
        for graph in model.graphs():
            for value in graph.initializers.values():
                t = value.const_value
                if type(t) is not ir.Tensor or t.nbytes < spill.min_bytes:
                    continue
                array = t.numpy()
                if isinstance(array, np.memmap) or array.dtype != t.dtype.numpy():
                    continue  # already mapped; or a packed type (int4, float8) numpy cannot hold as is
                mapped = spill(array)
                if mapped is not array:
                    value.const_value = ir.Tensor(mapped, t.dtype, shape=t.shape, name=t.name,
                                                  doc_string=t.doc_string, metadata_props=t.metadata_props)
        return spill.bytes
