"""Input data for validation, benchmarking and calibration.

A data source yields feeds, each a ``dict[str, np.ndarray]`` exactly as the model is fed. Sources:

- a directory of ``.npz`` files, one feed each, in sorted file-name order (``np.load(f)`` gives the feed);
- a single ``.npz`` whose arrays carry a leading sample axis: an array of rank ``r + 1`` for an input of
  rank ``r`` gives sample ``i`` as ``a[i]``; an array of the input's own rank is split along its first
  (batch) axis into batch-1 samples ``a[i:i+1]``;
- a Python iterable (or callable returning an iterator) of feed dicts;
- nothing: random data generated from the model's input shapes and dtypes with a seed (a warning says
  random data tells little about accuracy).

Feeds are loaded lazily, one at a time, and every feed is checked against the model's inputs: names,
dtypes, static dims, NaN/Inf. Errors name the input and the feed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, dims (int for static, str or None for symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple

    def concrete_shape(self, dims: Mapping[str, int] | None = None, default: int = 1) -> tuple:
        dims = dims or {}
        out = []
        for i, d in enumerate(self.dims):
            if isinstance(d, int):
                out.append(d)
            elif d is not None and d in dims:
                out.append(int(dims[d]))
            elif f"{self.name}:{i}" in dims:
                out.append(int(dims[f"{self.name}:{i}"]))
            else:
                out.append(default)
        return tuple(out)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Specs of the real inputs of ``model`` (initializers listed as inputs are left out)."""
    inits = set(model.graph.initializers)
    specs = []
    for v in model.graph.inputs:
        if v.name in inits:
            continue
        if v.dtype is None:
            raise DataError(f"model input {v.name!r} has no element type")
        dims = () if v.shape is None else tuple(
            (d if d >= 0 else None) if isinstance(d, int)  # exporters write -1 for "dynamic"
            else (d.value if isinstance(d, ir.SymbolicDim) else None)
            for d in v.shape
        )
        specs.append(InputSpec(v.name, np.dtype(v.dtype.numpy()), dims))
    return specs


def check_dims(specs: Sequence[InputSpec], dims: Mapping[str, int] | None) -> None:
    """Refuse ``dims`` keys (``--shape``) that would size nothing: a dim name no input has, ``input:axis``
    of no input or past its rank, or an axis the model fixes to another size. Ignored, they left the
    dims at 1 (or the feeds at another size) without a word."""
    if not dims:
        return
    names = {d for s in specs for d in s.dims if isinstance(d, str)}
    by_input = {s.name: s for s in specs}
    for key, size in dims.items():
        name, sep, axis = key.rpartition(":")
        if sep and name in by_input and axis.isdigit():
            spec, i = by_input[name], int(axis)
            if spec.dims and i >= len(spec.dims):
                raise DataError(f"--shape {key}: input {name!r} has {len(spec.dims)} axes")
            fixed = spec.dims[i] if spec.dims else None
            if isinstance(fixed, int) and fixed != int(size):
                raise DataError(f"--shape {key}={size}: axis {i} of input {name!r} is fixed at {fixed}")
        elif key not in names:
            raise DataError(f"--shape {key}: no input has a dim named {key!r} (named dims: "
                            f"{', '.join(sorted(names)) or 'none'}; or write INPUT:AXIS with an input of "
                            f"{', '.join(by_input)})")


def check_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec], where: str = "feed") -> None:
    """Raise ``DataError`` naming the input when ``feed`` does not match ``specs``."""
    names = {s.name for s in specs}
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing or extra:
        raise DataError(
            f"{where}: inputs do not match the model: missing {sorted(missing)}, unknown {sorted(extra)}; "
            f"the model takes {sorted(names)}"
        )
    for s in specs:
        a = feed[s.name]
        if not isinstance(a, np.ndarray):
            raise DataError(f"{where}: input {s.name!r} is a {type(a).__name__}, expected a numpy array")
        if a.dtype != s.dtype:
            raise DataError(f"{where}: input {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}")
        if s.dims and a.ndim != len(s.dims):
            raise DataError(
                f"{where}: input {s.name!r} has rank {a.ndim} (shape {a.shape}), the model expects "
                f"rank {len(s.dims)} {list(s.dims)}"
            )
        for i, d in enumerate(s.dims):
            if isinstance(d, int) and a.shape[i] != d:
                raise DataError(
                    f"{where}: input {s.name!r} has shape {a.shape}, the model expects {list(s.dims)} "
                    f"(dim {i} must be {d})"
                )
        if a.size == 0:
            raise DataError(f"{where}: input {s.name!r} is empty (shape {a.shape})")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise DataError(f"{where}: input {s.name!r} contains NaN or Inf")


class FeedSource:
    """A re-iterable, validated stream of feeds. ``len()`` is known for file and list sources."""

    def __init__(self, factory: Callable[[], Iterator[tuple[str, dict]]], specs, count, describe, key):
        self._factory = factory
        self.specs = list(specs)
        self._count = count
        self.description = describe
        self._key = key
        self.random = False
        #: Names of arrays carried with each feed that are not model inputs (labels); see ``labeled()``.
        self.extras: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for feed, _ in self.labeled():
            yield feed

    def labeled(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """``(feed, extras)`` pairs: arrays named in ``extras`` (where present and not model inputs)
        are split off before the feed check; a feed without them gets an empty ``extras``."""
        inputs = {s.name for s in self.specs}
        n = 0
        for where, feed in self._factory():
            extra = {}
            for name in self.extras:
                if name in feed and name not in inputs:
                    extra[name] = np.asarray(feed.pop(name))
            check_feed(feed, self.specs, where)
            n += 1
            yield feed, extra
        if n == 0:
            raise DataError(f"{self.description}: no feeds (the data is empty)")

    def __len__(self) -> int:
        if self._count is None:
            raise TypeError("this data source does not know its length")
        return self._count

    @property
    def count(self) -> int | None:
        return self._count

    def ticking(self, tick: Callable[[], None]) -> FeedSource:
        """A copy of this source that calls ``tick()`` after each feed has been used (progress)."""
        factory = self._factory

        def counted():
            for item in factory():
                yield item
                tick()

        out = copy.copy(self)
        out._factory = counted
        return out

    def subset(self, start: int, stop: int | None = None) -> FeedSource:
        """A copy of this source that yields only feeds ``start`` to ``stop`` (a slice by position)."""
        factory = self._factory

        def window():
            yield from itertools.islice(factory(), start, stop)

        out = copy.copy(self)
        out._factory = window
        out._key = None if self._key is None else f"{self._key}[{start}:{stop}]"
        n = self._count
        out._count = None if n is None else max(0, min(n, n if stop is None else stop) - start)
        out.description = f"{self.description} [feeds {start}:{'' if stop is None else stop}]"
        return out

    def fingerprint(self) -> str:
        """A content hash of every feed (for caches keyed by data)."""
        if self._key is not None:
            return self._key
        h = hashlib.sha256()
        for feed in self:
            for name in sorted(feed):
                a = np.ascontiguousarray(feed[name])
                h.update(name.encode())
                h.update(str(a.dtype).encode() + str(a.shape).encode())
                h.update(a.tobytes())
        self._key = h.hexdigest()[:16]
        return self._key


def feeds(
    source,
    model: ir.Model | Sequence[InputSpec],
    *,
    dims: Mapping[str, int] | None = None,
    count: int = 8,
    seed: int = 0,
    extras: Sequence[str] = (),
) -> FeedSource:
    """Open ``source`` (path, iterable, callable or None for random) as a ``FeedSource`` for ``model``.

    ``extras`` names arrays stored with each feed that are not model inputs (for example ``labels``
    for a task metric); ``FeedSource.labeled()`` yields them beside the feed.
    """
    src = _open_source(source, model, dims, count, seed)
    if extras:
        if src is source:  # never change the caller's FeedSource
            src = copy.copy(src)
        src.extras = tuple(extras)
    return src


def _open_source(source, model, dims, count, seed) -> FeedSource:
    specs = input_specs(model) if isinstance(model, ir.Model) else list(model)
    if source is None:
        return _random_source(specs, dims, count, seed)
    if isinstance(source, FeedSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _dir_source(path, specs)
        if path.suffix == ".npz" and path.is_file():
            return _stacked_source(path, specs)
        raise DataError(f"{path}: expected a directory of .npz files or one .npz file")
    if isinstance(source, Mapping):
        raise DataError("data: got one dict; pass a list of feed dicts (or a .npz path)")
    if callable(source):
        return FeedSource(lambda: _numbered(source()), specs, None, "data (callable)", None)
    if isinstance(source, Iterable):
        items = source if isinstance(source, (list, tuple)) else list(source)
        return FeedSource(lambda: _numbered(iter(items)), specs, len(items), "data (list)", None)
    raise DataError(f"cannot read data from a {type(source).__name__}")


def _numbered(it: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for i, feed in enumerate(it):
        if not isinstance(feed, Mapping):
            raise DataError(f"data: feed {i} is a {type(feed).__name__}, expected a dict of arrays")
        yield f"feed {i}", dict(feed)


def _dir_source(path: Path, specs) -> FeedSource:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
    if not files:
        raise DataError(f"{path}: no .npz files in this directory")

    def gen():
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    feed = {k: z[k] for k in z.files}
            except Exception as e:
                raise DataError(f"{f}: cannot read this .npz: {e}") from e
            yield str(f), feed

    stamp = hashlib.sha256()
    for f in files:
        st = f.stat()
        stamp.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return FeedSource(gen, specs, len(files), str(path), stamp.hexdigest()[:16])


def _stacked_source(path: Path, specs) -> FeedSource:
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{path}: cannot read this .npz: {e}") from e
    by_name = {s.name: s for s in specs}
    counts = {}
    per_sample_axis = {}
    for name, a in sorted(arrays.items(), key=lambda kv: kv[0] not in by_name):
        spec = by_name.get(name)
        if spec is None and per_sample_axis:  # not an input (labels): slice as the inputs are sliced
            per_sample_axis[name] = next(iter(per_sample_axis.values()))
            counts[name] = a.shape[0] if a.ndim else 0
            continue
        rank = len(spec.dims) if spec and spec.dims else a.ndim - 1
        per_sample_axis[name] = a.ndim == rank + 1
        counts[name] = a.shape[0] if a.ndim else 0
    if len(set(counts.values())) > 1:
        raise DataError(f"{path}: arrays have different sample counts {counts}")
    n = next(iter(counts.values()), 0)
    if n == 0:
        raise DataError(f"{path}: no samples")

    def gen():
        for i in range(n):
            yield f"{path}[{i}]", {
                k: (np.asarray(a[i]) if per_sample_axis[k] else a[i : i + 1]) for k, a in arrays.items()
            }

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return FeedSource(gen, specs, n, str(path), key)


def _random_source(specs, dims, count: int, seed: int) -> FeedSource:
    check_dims(specs, dims)
    logger.warning(
        "no data given: using %d random feeds (seed %d); random data says little about accuracy",
        count, seed,
    )

    def gen():
        for i in range(count):
            yield f"random feed {i}", random_feed(specs, seed + i, dims)

    src = FeedSource(gen, specs, count, f"random (seed {seed})", f"random-{seed}-{count}-{dims}")
    src.random = True
    return src


def random_feed(specs: Sequence[InputSpec], seed: int, dims: Mapping[str, int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        shape = s.concrete_shape(dims)
        if s.dtype.kind == "f":
            feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype.kind == "b":
            feed[s.name] = rng.integers(0, 2, shape).astype(bool)
        elif s.dtype.kind in "iu":
            feed[s.name] = rng.integers(0, 4, shape).astype(s.dtype)
        else:
            raise DataError(f"cannot generate random data for input {s.name!r} of dtype {s.dtype}")
    return feed
