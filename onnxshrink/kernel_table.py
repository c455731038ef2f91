"""How fast ONNX Runtime's CPU kernels run by channel width: what latency-aware pruning budgets with.

A :class:`KernelTable` holds, per kernel kind and spatial size, throughput in GMAC/s by output width
(``out``) and a relative factor by input width (``in``), plus per-node and per-run overheads in
microseconds. Kinds: ``conv`` (k x k, k > 1, one group), ``conv1x1``, ``depthwise`` (one channel per
group) and ``gemm`` (Gemm, MatMul). Between measured widths throughput is interpolated linearly; it is
taken as never falling with width (a running maximum), which also smooths timing noise.

:data:`DEFAULT` is the fallback used unless a measured table is asked for (with this CPU's NCHWc block,
:func:`default_here`): the curves
``benchmarks/bench_prune_kernels.py`` measured on a 2-core AVX-512 Xeon (ONNX Runtime 1.32, 1 thread,
16x16, batch 32; ``benchmarks/results/prune_kernels.md``, "Conv kernel throughput by width"): 3x3
convs ~86 GMAC/s from 64 output channels, 72 at 32, 47 at 16 (row ``3x3 cin=64``); 1x1 82/70/52;
depthwise ~25 at every multiple of 16. The 1x1 input-width factors and the ``gemm`` (MatMul) curve
come from one run of :func:`measure` on that machine, which no results file in ``benchmarks/`` keeps:
run :func:`measure` (or ``--kernel-table measure``) to get this machine's.

:func:`measure` times one-layer models (the kernel's time from ONNX Runtime's profiler, the NCHWc
reorders around it left out) on this machine at the given spatial sizes and batch (the pruning
planner passes the batch it plans for, 1 unless ``dims`` set it); :func:`load` with ``"measure"``
measures once and caches the table on disk under ``~/.cache/onnxshrink/kernels/``, keyed by the ONNX
Runtime version, the CPU model, the NCHWc block, the grid and the batch. Memory-bound ops
(pooling, Concat, Transpose, normalizations, Softmax, unfused elementwise ops) cost ``node_us`` plus
nanoseconds per input element (:data:`MEMORY_NS`; measured tables take these defaults too).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from onnxshrink.errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "onnxshrink.kernel-table/1"
KINDS = ("conv", "conv1x1", "depthwise", "gemm")
NCHWC_KINDS = ("conv", "conv1x1", "depthwise")
WIDTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
#: Throughput kept when the input channels of an NCHWc conv are not whole blocks (ONNX Runtime falls
#: back to im2col + SGEMM: 34-48 against 72-89 GMAC/s at 32-64 channels, prune_kernels.md).
OFF_BLOCK = 0.5
#: Memory-bound ops: nanoseconds per input element beyond ``node_us``, rough values from one-node
#: timings (1 thread) that no benchmark in the repo reproduces; :func:`measure` does not measure them.
#: Pooling adds ``WINDOW_NS`` per window tap over the stride area. Ops not listed: ``ELEMENTWISE_NS``.
MEMORY_NS = {
    "MaxPool": 0.25, "AveragePool": 0.25, "LpPool": 0.25, "GlobalAveragePool": 0.4, "GlobalMaxPool": 0.4,
    "ReduceMean": 0.4, "ReduceSum": 0.4, "ReduceMax": 0.4, "ReduceMin": 0.4, "Concat": 0.25, "Split": 0.25,
    "Slice": 0.25, "Pad": 0.25, "Gather": 0.25, "Expand": 0.25, "Tile": 0.25, "Transpose": 0.9,
    "LayerNormalization": 0.9, "InstanceNormalization": 0.9, "GroupNormalization": 0.9,
    "BatchNormalization": 0.2, "Softmax": 1.3, "LogSoftmax": 1.3, "Resize": 0.9, "Erf": 0.5, "Sigmoid": 0.5,
    "Tanh": 0.5, "Exp": 0.5, "Log": 0.5, "Softplus": 0.5, "Gelu": 0.6,
}
ELEMENTWISE_NS = 0.2
WINDOW_NS = 0.07


@dataclasses.dataclass(frozen=True)
class Curve:
    kind: str
    hw: int  # output spatial size (sqrt of the output positions; rows for gemm)
    out: dict[int, float]  # output width -> GMAC/s
    in_: dict[int, float]  # input width -> relative factor (1.0 where not measured)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_arrays", (_arrays(self.out), _arrays(self.in_) if self.in_ else None))

    def gmacs(self, cin: float, cout: float) -> float:
        out, in_ = self._arrays
        return _interp(out, cout) * (_interp(in_, cin) if in_ is not None else 1.0)


def _arrays(points: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    xs = np.array(sorted(points), dtype=float)
    return xs, np.maximum.accumulate(np.array([points[int(x)] for x in xs], dtype=float))


def _interp(arrays: tuple[np.ndarray, np.ndarray], w: float) -> float:
    """Linear between measured widths; below the narrowest, in proportion to the width."""
    xs, ys = arrays
    if w < xs[0]:
        return float(ys[0] * max(w, 1.0) / xs[0])
    return float(np.interp(w, xs, ys))


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """Throughput curves and overheads; :meth:`gmacs` picks the curve of the nearest spatial size."""

    curves: tuple[Curve, ...]
    block: int = 16  # NCHWc channel block the curves were measured with (1: no NCHWc layout)
    node_us: float = 0.3  # per node and per run: prune_kernels.md, "Per-run and per-node overhead"
    run_us: float = 5.4
    source: str = "default"
    memory: tuple[tuple[str, float], ...] = tuple(MEMORY_NS.items())  # op -> ns per input element

    def memory_ns(self, op_type: str) -> float:
        """Nanoseconds per input element of a memory-bound op (``ELEMENTWISE_NS`` if not listed)."""
        return dict(self.memory).get(op_type, ELEMENTWISE_NS)

    def gmacs(self, kind: str, cin: float, cout: float, hw: int) -> float:
        cands = [c for c in self.curves if c.kind == kind] or [c for c in self.curves if c.kind == "conv"]
        if not cands:
            raise ConfigError(f"kernel table {self.source} has no curve for {kind!r}")
        best = min(cands, key=lambda c: (abs(np.log2(max(hw, 1)) - np.log2(max(c.hw, 1))), c.hw))
        return best.gmacs(cin, cout)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "block": self.block, "node_us": self.node_us, "run_us": self.run_us,
                "source": self.source, "memory_ns": dict(self.memory),
                "curves": [{"kind": c.kind, "hw": c.hw, "out": [[w, g] for w, g in sorted(c.out.items())],
                            "in": [[w, g] for w, g in sorted(c.in_.items())]} for c in self.curves]}

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> KernelTable:
        if d.get("format") != FORMAT:
            raise ConfigError(f"not a kernel table (format {d.get('format')!r}, expected {FORMAT!r})")
        try:
            curves = tuple(Curve(c["kind"], int(c["hw"]), {int(w): float(g) for w, g in c["out"]},
                                 {int(w): float(g) for w, g in c.get("in", [])}) for c in d["curves"])
            memory = {**MEMORY_NS, **{k: float(v) for k, v in d.get("memory_ns", {}).items()}}
            return cls(curves, int(d.get("block", 16)), float(d.get("node_us", 0.3)), float(d.get("run_us", 5.4)),
                       source or d.get("source", "file"), tuple(memory.items()))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"kernel table: malformed entry: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        from onnxshrink.report import write_json

        write_json(path, self.to_dict())
        return Path(path)


DEFAULT = KernelTable(
    (
        Curve("conv", 16, {16: 46.9, 32: 72.7, 48: 80.5, 64: 85.7, 128: 85.0, 256: 85.3}, {}),
        Curve("conv1x1", 16, {16: 52.4, 32: 70.5, 48: 78.0, 64: 82.4, 128: 83.3, 256: 86.3},
              {16: 0.89, 32: 0.96, 48: 0.98, 64: 1.0}),
        Curve("depthwise", 16, {16: 24.1, 32: 25.4, 48: 26.0, 64: 26.0, 256: 26.0}, {}),
        Curve("gemm", 16, {16: 29.1, 32: 43.7, 48: 60.5, 64: 65.5, 96: 68.4, 128: 74.9, 192: 78.6, 256: 80.7,
                           512: 83.1}, {16: 0.56, 32: 0.75, 64: 1.0, 96: 1.12, 128: 1.29, 256: 1.47}),
    ),
    block=16, source="default",
)


@functools.cache
def default_here() -> KernelTable:
    """:data:`DEFAULT`'s curves with this CPU's NCHWc block (asked of ONNX Runtime: 8 with AVX2, 1 where
    there is no NCHWc layout): which widths ONNX Runtime pads and which inputs fall off its blocked
    kernels is the machine's, not the curves'. :data:`DEFAULT` itself where the block is 16 or unknown."""
    from onnxshrink import ort_blocks

    block = ort_blocks.nchwc_block_size()
    if block in (0, DEFAULT.block):
        return DEFAULT
    return dataclasses.replace(DEFAULT, block=block, source=f"default (NCHWc block {block} here)")


def load(spec: str | os.PathLike | KernelTable | None = None, *, hws=(16,), batch: int | None = None) -> KernelTable:
    """``None``/``"default"``: :func:`default_here`; ``"measure"``: measured here (cached on disk) at
    ``batch`` (see :func:`measure`); a path: a saved table; a table: itself."""
    if isinstance(spec, KernelTable):
        return spec
    if spec is None or spec == "default":
        return default_here()
    if spec == "measure":
        return cached(hws, batch)
    path = Path(spec)
    try:
        return KernelTable.from_dict(json.loads(path.read_text()), source=str(path))
    except FileNotFoundError as e:
        raise ConfigError(f"kernel table {path}: no such file (or use 'default' or 'measure')") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"kernel table {path}: not JSON: {e}") from e


# ---------------------------------------------------------------- measuring on this machine


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxshrink" / "kernels"


def fingerprint(hws, widths=WIDTHS, batch: int | None = None) -> str:
    from onnxshrink import ort_blocks, runtime

    cpu = ort_blocks.cpu_name()
    key = [runtime.ort().__version__, cpu, ort_blocks.nchwc_block_size(), sorted(hws), list(widths)]
    key = json.dumps(key if batch is None else [*key, int(batch)])  # tables cached without a batch stay valid
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def cached(hws=(16,), batch: int | None = None) -> KernelTable:
    """The table measured on this machine for these spatial sizes (and batch), measured once and kept
    on disk."""
    hws = tuple(sorted({int(h) for h in hws}))
    path = cache_dir() / f"{fingerprint(hws, batch=batch)}.json"
    if path.exists():
        try:
            return KernelTable.from_dict(json.loads(path.read_text()), source=f"measured ({path})")
        except (ConfigError, json.JSONDecodeError) as e:
            logger.warning("kernel table cache %s unreadable (%s); measuring again", path, e)
    table = measure(hws, batch=batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return dataclasses.replace(table, source=f"measured ({path})")


def measure(hws=(16,), widths=WIDTHS, runs: int = 15, batch: int | None = None) -> KernelTable:
    """Time every kind by output width (64 inputs) and by input width (64 outputs) at each spatial size,
    convs at ``batch`` images (None: enough images for 4096 output positions, which small maps run
    faster per MAC than they do one image at a time)."""
    from onnxshrink import ort_blocks

    block = max(ort_blocks.nchwc_block_size(), 1)
    curves = []
    with tempfile.TemporaryDirectory(prefix="onnxshrink-kernels-") as tmp:
        for hw in hws:
            for kind in KINDS:
                out = {w: _time(kind, 64, w, hw, tmp, runs, batch) for w in widths}
                in_ = {} if kind == "depthwise" else {w: _time(kind, w, 64, hw, tmp, runs, batch) for w in widths}
                ref = in_.get(64) or 1.0
                curves.append(Curve(kind, hw, out, {w: g / ref for w, g in in_.items()}))
                logger.info("kernel table %s hw %d: %s", kind, hw, {w: round(g, 1) for w, g in out.items()})
    return KernelTable(tuple(curves), block, source="measured")


def _time(kind: str, cin: int, cout: int, hw: int, tmp: str, runs: int, batch: int | None = None) -> float:
    """GMAC/s of one layer's kernel (median of ``runs`` profiled runs)."""
    from onnxshrink import runtime

    if kind == "depthwise":
        cin = cout
    model, feed, macs = _layer_model(kind, cin, cout, hw, batch)
    rt = runtime.ort()
    so = runtime.session_options(1, level=rt.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.enable_profiling, so.profile_file_prefix = True, os.path.join(tmp, "k")
    sess = runtime.make_session(model, ["CPUExecutionProvider"], options=so)
    for _ in range(3 + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    ops = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul")
    durs = [e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and e["args"].get("op_name") in ops]
    us = max(float(np.median(durs[-runs:])) if durs else 0.0, 1.0)
    return macs / (us * 1e3)


def _layer_model(kind: str, cin: int, cout: int, hw: int, batch: int | None = None) -> tuple[bytes, dict, int]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "gemm":
        rows = max(hw * hw, 64)
        w = numpy_helper.from_array(rng.random((cin, cout), np.float32), "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        x = rng.random((rows, cin), np.float32)
        shapes, macs = ([rows, cin], [rows, cout]), rows * cin * cout
    else:
        k = 1 if kind == "conv1x1" else 3
        group = cout if kind == "depthwise" else 1
        batch = batch or max(1, 4096 // (hw * hw))
        w = numpy_helper.from_array(rng.random((cout, cin // group, k, k), np.float32), "w")
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, group=group)]
        x = rng.random((batch, cin, hw, hw), np.float32)
        shapes, macs = ([batch, cin, hw, hw], [batch, cout, hw, hw]), batch * hw * hw * cout * (cin // group) * k * k
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), {"x": x}, macs
