"""``onnxshrink.spill``: large arrays mapped from an unlinked temporary file, and reconstruction's refit
weights kept there until the model is saved."""

from __future__ import annotations

import numpy as np
import pytest

from models import digits
from onnxshrink import bias_correction, pruning, spill
from onnxshrink.spill import Spill


def test_spill_maps_large_arrays_and_leaves_small_ones():
    small = np.ones(10, np.float32)
    big = np.arange(4096, dtype=np.float32).reshape(64, 64)
    odd = np.arange(1001, dtype=np.float64)  # not a multiple of the alignment
    with Spill(min_bytes=1024) as s:
        assert s(small) is small
        mapped = [s(big), s(odd), s(big[::-1])]  # a strided view is copied as its values
        assert s.bytes == 2 * big.nbytes + odd.nbytes
    for m, want in zip(mapped, (big, odd, big[::-1])):  # still readable after the file is closed
        assert isinstance(m, np.memmap) and m.dtype == want.dtype and m.shape == want.shape
        np.testing.assert_array_equal(m, want)
    assert mapped[0].offset % 4096 == 0 and mapped[2].offset % 4096 == 0


def test_refit_weights_are_spilled_and_the_saved_model_is_the_same(monkeypatch, tmp_path):
    """With every refit weight spilled (threshold one byte) the saved model is byte for byte the one
    written from memory, and the refit weights in the returned model are file mappings (``lossless``
    off: the passes after pruning fold some of them into new weights, e.g. a BatchNorm into a conv's)."""
    name = "cnn"
    calib = digits.feeds(name, "calib", batch=32, limit=96)
    path = str(digits.trained_path(name))
    kept_in_memory = pruning.prune(path, 0.3, tmp_path / "memory.onnx", calibration=calib, reconstruct="lsq",
                                    lossless=False)
    monkeypatch.setattr(spill, "MIN_BYTES", 1)
    spilled = pruning.prune(path, 0.3, tmp_path / "spilled.onnx", calibration=calib, reconstruct="lsq",
                            lossless=False)
    assert (tmp_path / "memory.onnx").read_bytes() == (tmp_path / "spilled.onnx").read_bytes()

    def mapped(model) -> int:
        return sum(isinstance(v.const_value.numpy(), np.memmap) for v in model.graph.initializers.values())

    written = [f for f in spilled.reconstruction["refit"] if f["mse_after"] < f["mse_before"]]
    assert written and mapped(spilled.model) >= len(written)  # a weight each (and most a bias)
    assert mapped(kept_in_memory.model) == 0


def test_a_temporary_folder_that_cannot_take_the_file_keeps_arrays_in_memory(tmp_path, caplog):
    big = np.arange(4096, dtype=np.float32)
    with Spill(min_bytes=1024, directory=tmp_path / "missing") as s:
        assert s(big) is big and s.failed and "missing" in s.failed
        assert s(big * 2) is not None and s.bytes == 0  # later arrays stay in memory too, no retry
    assert "stay in memory" in caplog.text


def test_a_full_disk_is_an_error_before_any_write(monkeypatch):
    """The file's blocks are reserved before the mapping is written (a write into a sparse file on a
    full disk would be a SIGBUS); a reservation that fails leaves the array in memory."""
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spill.os, "posix_fallocate", full)
    big = np.ones(4096, np.float32)
    with Spill(min_bytes=1024) as s:
        assert s(big) is big and "No space" in s.failed


@pytest.mark.parametrize("correct", [False, True])
def test_quantized_weights_are_spilled_and_the_saved_model_is_the_same(monkeypatch, tmp_path, correct):
    """Every model ``quantize`` builds moves its in-memory initializers to a spill file
    (``spill_initializers``): with a one-byte threshold the saved model is byte for byte the one
    written with nothing spilled, and the returned model's weights are file mappings. With bias
    correction the weights are spilled before its measurement reads them (its probe session)."""
    import onnxshrink

    name = "cnn"
    feeds = digits.feeds(name, "calib", batch=32, limit=64)
    path = str(digits.trained_path(name))
    kw = {"tune": False, "cache_dir": False, "method": "minmax", "bias_correction": correct,
          "pair_safe": False}
    monkeypatch.setattr(spill, "MIN_BYTES", 1 << 40)
    in_memory = onnxshrink.quantize(path, feeds, tmp_path / "memory.onnx", **kw)
    monkeypatch.setattr(spill, "MIN_BYTES", 1)
    measure, seen = bias_correction.measure_sets, []

    def measure_spy(float_model, target_sets, *args, **kwargs):  # what the probe session is built beside
        seen.extend(isinstance(t.node.inputs[1].producer().inputs[0].const_value.numpy(), np.memmap)
                    for targets in target_sets for t in targets)
        return measure(float_model, target_sets, *args, **kwargs)

    monkeypatch.setattr(bias_correction, "measure_sets", measure_spy)
    spilled = onnxshrink.quantize(path, feeds, tmp_path / "spilled.onnx", **kw)
    assert (len(seen) >= 4 and all(seen)) if correct else not seen  # the int8 weights are in the file
    assert (tmp_path / "memory.onnx").read_bytes() == (tmp_path / "spilled.onnx").read_bytes()

    def mapped(model) -> int:
        return sum(isinstance(v.const_value.numpy(), np.memmap) for v in model.graph.initializers.values()
                   if v.const_value is not None and v.const_value.dtype.numpy() == v.const_value.numpy().dtype)

    assert mapped(in_memory.model) == 0 and mapped(spilled.model) >= 4  # the weights of its 4 layers at least
