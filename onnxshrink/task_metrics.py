"""Task metrics for ``validate``: a score per feed from a model's outputs and that feed's labels.

Protocol: ``metric(outputs, labels) -> score | (score, weight)``, called once per feed with the model's
outputs by name and the feed's labels (an array stored with each feed, not a model input; None
without one). The weight defaults to ``len(labels)`` (1 without labels); the data set's score is the
weighted mean. Scores are higher-is-better (return a negative loss). ``load_metric`` resolves a
built-in name (``accuracy``), ``module:function`` (the current folder is searched) or
``path/to/file.py:function``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from onnxshrink.errors import ConfigError, DataError

Metric = Callable[[Mapping[str, np.ndarray], "np.ndarray | None"], "float | tuple[float, float]"]


def classifier_like(a: np.ndarray) -> bool:
    """A 2-D ``[N, C]`` float array with at least two classes."""
    return a.ndim == 2 and a.shape[1] >= 2 and a.dtype.kind == "f"


@dataclasses.dataclass
class MetricResult:
    """A task metric for both models; ``drop = reference - candidate`` (scores are higher-is-better)."""

    name: str
    reference: float
    candidate: float

    @property
    def difference(self) -> float:
        return self.candidate - self.reference

    @property
    def drop(self) -> float:
        return self.reference - self.candidate

    def to_dict(self) -> dict:
        return {"name": self.name, "reference": self.reference, "candidate": self.candidate,
                "difference": self.difference, "drop": self.drop}


class ScoreSum:
    """Weighted running sum of a metric's per-feed scores for one model."""

    def __init__(self, fn: Metric, name: str) -> None:
        self.fn, self.name = fn, name
        self.total = self.weight = 0.0

    def add(self, outputs, labels) -> None:
        try:
            value = self.fn(outputs, labels)
        except (DataError, ConfigError):
            raise
        except Exception as e:  # user code may raise anything
            raise ConfigError(f"metric {self.name!r} raised {type(e).__name__}: {e}") from e
        if isinstance(value, tuple):
            score, weight = float(value[0]), float(value[1])
        else:
            score, weight = float(value), float(len(labels)) if labels is not None and np.ndim(labels) else 1.0
        self.total += score * weight
        self.weight += weight

    def mean(self) -> float:
        if self.weight <= 0:
            raise ConfigError(f"metric {self.name!r}: the weights sum to {self.weight}; return (score, weight > 0)")
        return self.total / self.weight


def accuracy(outputs: Mapping[str, np.ndarray], labels) -> tuple[float, float]:
    """Top-1 accuracy of the first classifier-like output against integer ``labels`` (one per row)."""
    if labels is None:
        raise DataError("the accuracy metric needs labels stored with the data (a 'labels' array)")
    logits = next((a for a in outputs.values() if classifier_like(np.asarray(a))), None)
    if logits is None:
        raise DataError("the accuracy metric needs a 2-D [N, classes] float output")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise DataError(f"accuracy: {len(labels)} labels for {len(logits)} output rows")
    correct = float((np.asarray(logits).argmax(axis=1) == labels).sum())
    return correct / len(labels), float(len(labels))


#: Metrics available by name on the command line.
BUILTIN_METRICS: dict[str, Metric] = {"accuracy": accuracy}


def load_metric(spec: str) -> Metric:
    """A built-in metric name, ``module:function`` (importable; the current folder is searched) or
    ``path/to/file.py:function``."""
    if spec in BUILTIN_METRICS:
        return BUILTIN_METRICS[spec]
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"metric {spec!r}: write module:function, file.py:function or one of "
                          f"{sorted(BUILTIN_METRICS)}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            mod_spec = importlib.util.spec_from_file_location(f"_onnxshrink_metric_{path.stem}", path)
            if mod_spec is None or not path.is_file():
                raise FileNotFoundError(target)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        fn = getattr(module, attr)
    except (ImportError, OSError, AttributeError, SyntaxError) as e:
        raise ConfigError(f"metric {spec!r}: cannot load it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise ConfigError(f"metric {spec!r}: {attr} is not callable")
    return fn
