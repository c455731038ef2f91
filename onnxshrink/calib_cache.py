"""The on-disk calibration cache: tables as JSON, histogram states as ``.npz``, under hashed keys.

A table's key covers the model and data fingerprints, the tensor set, method, observer options, batch
size, providers and channel-mean tensors; the histogram key leaves out the method and its search options
(only ``bins`` and ``outlier_abs`` shape a histogram), so every histogram method, and min/max, can be
answered from one run. Writes are atomic (temporary file, then rename); a failed write is logged, never
raised, and an unreadable entry is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxshrink.observers import DEFAULT_BINS

logger = logging.getLogger(__name__)

FORMAT = 1


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "onnxshrink" / "calib"


@dataclasses.dataclass(frozen=True)
class CacheKeys:
    """What a cached table (``table``) or histogram set (``hist``) depends on, hashed."""

    model: str
    data: str
    names: Sequence[str]
    method: str
    options: Mapping
    batch_size: int
    providers: Sequence[str]
    means: tuple[str, ...]

    def _digest(self, parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def hist(self) -> str:
        opts = {k: self.options.get(k) for k in ("bins", "outlier_abs")}
        opts["bins"] = opts["bins"] or DEFAULT_BINS
        return self._digest({"v": FORMAT, "model": self.model, "data": self.data, "taps": sorted(self.names),
                             "opts": opts, "batch": self.batch_size, "providers": list(self.providers)})

    @property
    def table(self) -> str:
        return self._digest({"hist": self.hist, "method": self.method, "options": dict(self.options),
                             "means": list(self.means)})


class CalibCache:
    """Tables (JSON) and histogram states (.npz) under one folder; failures to write are logged."""

    def __init__(self, cache_dir) -> None:
        if cache_dir is False:
            self.dir = None
        else:
            self.dir = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()

    def load_table(self, key: CacheKeys) -> dict | None:
        """The cached table as a dict (``CalibrationTable.from_dict``), or None."""
        if self.dir is None or not (path := self.dir / f"{key.table}.json").is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable cached calibration table %s: %s", path, e)
            return None

    def save_table(self, key: CacheKeys, table: dict) -> None:
        self._write(lambda f: f.write(json.dumps(table, indent=1).encode()), f"{key.table}.json")

    def load_hist(self, key: CacheKeys):
        if self.dir is None or not (path := self.dir / f"hist-{key.hist}.npz").is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(n) for n in z["names"]]
                states = [{"counts": z["counts"][i], "scalars": z["scalars"][i], "tallies": z["tallies"][i]}
                          for i in range(len(names))]
                cmeans = {str(n): z[f"cmean_{i}"] for i, n in enumerate(z["cmean_names"])}
                return names, states, cmeans, int(z["samples"])
        except (OSError, ValueError, KeyError) as e:
            logger.warning("ignoring unreadable cached histograms %s: %s", path, e)
            return None

    def save_hist(self, key: CacheKeys, names, observers, cmeans, samples: int) -> None:
        states = [o.state() for o in observers]
        arrays = {
            "names": np.array(names, dtype=str), "samples": np.array(samples),
            "counts": np.stack([s["counts"] for s in states]),
            "scalars": np.stack([s["scalars"] for s in states]),
            "tallies": np.stack([s["tallies"] for s in states]),
            "cmean_names": np.array(list(cmeans), dtype=str),
            **{f"cmean_{i}": np.asarray(v) for i, v in enumerate(cmeans.values())},
        }
        self._write(lambda f: np.savez_compressed(f, **arrays), f"hist-{key.hist}.npz")

    def _write(self, writer, name: str) -> None:
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.dir)
        except OSError as e:
            logger.warning("could not write the calibration cache in %s: %s", self.dir, e)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            os.replace(tmp, self.dir / name)
        except OSError as e:
            logger.warning("could not write the calibration cache %s: %s", self.dir / name, e)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
