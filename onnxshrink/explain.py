"""Where the drift comes from: rank a candidate's nodes by the error each one adds.

``explain(reference, candidate, data)`` maps the candidate's tensors to the reference's, exposes them
as extra graph outputs on a copy of each model, runs a few feeds through both (streamed: only the
running sums are kept), and measures every mapped tensor's SQNR against the reference. For each
node: its output SQNR (the lowest over its outputs), its input SQNR (the lowest over its non-constant
inputs), the *drop* between them in dB, and the *added noise*: the relative noise power of the output
minus that of the input, ``10^(-out/10) - 10^(-in/10)``, the error the node itself adds. Nodes are
ranked by added noise, worst first (a dB drop overrates the first lossy node after exact inputs: from
inf to 40 dB is a big drop but little noise). ``rank_nodes`` returns that ranking; it is the input of
the mixed-precision fallback (keep the top nodes in float, or prune them less).

Mapping, by graph structure (never by parsing names):

- a candidate value maps to the reference value of the same name (our passes keep names);
- the output of a ``DequantizeLinear`` fed by a ``QuantizeLinear`` stands for the Q's input (followed
  through chains of such pairs): a node reading a quantized activation has the float tensor as its
  input, so the quantization error of the activation and of the node's own weights both count in
  that node's drop;
- constants (initializers, ``Constant`` outputs, and ``DequantizeLinear`` of constants) are not
  activations and are left out of the input SQNR; graph inputs are fed identically (SQNR inf).

Values whose shapes differ (pruned channels) are listed as unmatched; nodes inside subgraphs are not
ranked. SQNRs above ``SQNR_CAP`` dB (float rounding) count as the cap when taking differences.

The tapped models are small graphs: a model with external data is saved next to its weights as a
hidden file that references the same data file (the weights are never copied through Python), and
removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink import model_io, runtime
from onnxshrink.errors import DataError, OutputError, RuntimeFailure
from onnxshrink.graph_utils import clone_model

logger = logging.getLogger(__name__)

SQNR_CAP = 150.0
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclasses.dataclass
class TensorDrift:
    """SQNR of one candidate tensor against its reference counterpart."""

    reference: str
    candidate: str
    sqnr_db: float = math.inf
    max_abs_error: float = 0.0
    elements: int = 0
    problem: str | None = None


@dataclasses.dataclass
class NodeDrift:
    """One candidate node: output and input SQNR, the drop across it (dB), the noise it adds."""

    node: str
    op_type: str
    sqnr_db: float
    input_sqnr_db: float
    drop_db: float
    added_noise: float
    outputs: list[str]
    inputs: list[str]

    def line(self, width: int = 32, op_width: int = 18) -> str:
        return (f"{self.node:{width}s} {self.op_type:{op_width}s} SQNR {_db(self.sqnr_db):>8s} dB   "
                f"drop {_db(self.drop_db):>8s} dB   added noise {self.added_noise:9.3g}")


@dataclasses.dataclass
class ExplainReport:
    nodes: list[NodeDrift]
    tensors: dict[str, TensorDrift]
    batches: int
    unmatched: list[str]

    def top(self, n: int = 10) -> list[NodeDrift]:
        return self.nodes[:n]

    def to_dict(self) -> dict:
        def clean(d):
            return {k: (_db(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

        return {
            "batches": self.batches,
            "nodes": [clean(dataclasses.asdict(n)) for n in self.nodes],
            "tensors": {k: clean(dataclasses.asdict(t)) for k, t in self.tensors.items()},
            "unmatched": self.unmatched,
        }


def _db(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def rank_nodes(reference, candidate, data=None, **kwargs) -> list[NodeDrift]:
    """The candidate's nodes ranked by the SQNR drop they add, worst first (see ``explain``)."""
    return explain(reference, candidate, data, **kwargs).nodes


def explain(
    reference,
    candidate,
    data=None,
    *,
    providers=None,
    threads: int | None = None,
    batches: int = 4,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> ExplainReport:
    """Measure every mapped tensor on ``batches`` feeds of ``data`` and rank the candidate's nodes.

    Models: paths, bytes, ``onnx.ModelProto`` or ``ir.Model`` (never modified: copies are tapped).
    ``data``: anything ``onnxshrink.data.feeds`` takes (None: random feeds, with a warning); a
    ``labels`` array kept with the feeds is ignored.
    """
    if batches < 1:
        raise DataError(f"batches must be >= 1, got {batches}")
    ref = clone_model(model_io.load(reference))
    cand = clone_model(model_io.load(candidate))
    taps, unmatched = map_tensors(ref, cand)
    if not taps:
        raise DataError("no candidate tensor maps to a reference tensor (do the models share tensor names?)")
    ref_values = {v.name: v for v in _activations(ref.graph)}
    acc = {c.name: _TapAccumulator(r, c.name) for c, r in taps.items()}
    cand_names = [c.name for c in taps]
    ref_names = [taps[c] for c in taps]
    source = data_mod.feeds(data, ref, dims=dims, count=batches, seed=seed, extras=("labels",))
    n = 0
    with _tapped_session(ref, [ref_values[r] for r in dict.fromkeys(ref_names)], providers, threads) as rs, \
            _tapped_session(cand, list(taps), providers, threads) as cs:
        unique_ref = list(dict.fromkeys(ref_names))
        for feed in source:
            ref_out = dict(zip(unique_ref, _run(rs, unique_ref, feed, "reference")))
            cand_out = _run(cs, cand_names, feed, "candidate")
            for name, c_arr in zip(cand_names, cand_out):
                acc[name].update(ref_out[acc[name].t.reference], c_arr)
            n += 1
            if n >= batches:
                break
    tensors = {a.result().candidate: a.result() for a in acc.values()}
    unmatched += [t.candidate for t in tensors.values() if t.problem]
    nodes = _rank(cand, tensors)
    return ExplainReport(nodes, tensors, n, unmatched)


def float_source(value: ir.Value) -> ir.Value:
    """Follow ``DequantizeLinear(QuantizeLinear(x))`` pairs back to ``x``; other values map to themselves."""
    seen = set()
    while id(value) not in seen:
        seen.add(id(value))
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            return value
        q_out = dq.inputs[0]
        q = q_out.producer() if q_out is not None else None
        if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None:
            return value
        value = q.inputs[0]
    return value


def is_constant(value: ir.Value) -> bool:
    """Initializers, ``Constant`` outputs and Q/DQ chains over them (quantized weights)."""
    while True:
        if value.const_value is not None or value.is_initializer():
            return True
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        if node.op_type not in _QDQ_OPS or node.inputs[0] is None:
            return False
        value = node.inputs[0]


def map_tensors(ref: ir.Model, cand: ir.Model) -> tuple[dict[ir.Value, str], list[str]]:
    """Candidate activation values -> the name of their reference value; and the unmatched names."""
    ref_values = {v.name: v for v in _activations(ref.graph)}
    taps: dict[ir.Value, str] = {}
    unmatched: list[str] = []
    renamed: dict[ir.Value, ir.Value] = {}  # float source -> reference value, for Q/DQ outputs that kept the name
    for value in _activations(cand.graph):
        if value.producer() is not None and value.producer().op_type in _QDQ_OPS:
            # stands for its float source, mapped on its own; a graph output's Q/DQ takes the original name
            src = float_source(value)
            if src is not value and value.name in ref_values:
                renamed[src] = ref_values[value.name]
            continue
        target = ref_values.get(value.name)
        if target is None or _static_shape_differs(value, target):
            unmatched.append(value.name)
        else:
            taps[value] = target.name
    for src, target in renamed.items():
        if src not in taps and src.name in unmatched and not _static_shape_differs(src, target):
            taps[src] = target.name
            unmatched.remove(src.name)
    return taps, unmatched


def _activations(graph: ir.Graph) -> Iterator[ir.Value]:
    """Non-constant, named node outputs of the main graph."""
    for node in graph:
        if node.op_type == "Constant":
            continue
        for v in node.outputs:
            if v.name and not is_constant(v):
                yield v


def _static_shape_differs(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a.shape, b.shape))


class _TapAccumulator:
    def __init__(self, reference: str, candidate: str) -> None:
        self.t = TensorDrift(reference, candidate)
        self.signal = self.noise = 0.0

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if self.t.problem:
            return
        if ref.shape != cand.shape:
            self.t.problem = f"shape {list(cand.shape)} differs from the reference's {list(ref.shape)}"
            return
        if ref.dtype.kind not in "fiub" or cand.dtype.kind not in "fiub":
            self.t.problem = f"dtype {cand.dtype} / {ref.dtype} is not numeric"
            return
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        d = c - r
        if not np.all(np.isfinite(d)):
            self.noise = math.inf
            self.t.max_abs_error = math.inf
        else:
            self.noise += float(d @ d)
            if d.size:
                self.t.max_abs_error = max(self.t.max_abs_error, float(np.abs(d).max()))
        rf = r[np.isfinite(r)]
        self.signal += float(rf @ rf)
        self.t.elements += r.size

    def result(self) -> TensorDrift:
        if not self.t.problem:
            if self.noise == 0:
                self.t.sqnr_db = math.inf
            elif self.signal == 0 or math.isinf(self.noise):
                self.t.sqnr_db = -math.inf
            else:
                self.t.sqnr_db = 10.0 * math.log10(self.signal / self.noise)
        return self.t


def _rank(cand: ir.Model, tensors: dict[str, TensorDrift]) -> list[NodeDrift]:
    """Drop across each mapped compute node of the candidate's main graph, worst first."""

    def sqnr_of(value: ir.Value) -> float | None:
        t = tensors.get(value.name)
        if t is not None and not t.problem:
            return t.sqnr_db
        return math.inf if value.is_graph_input() else None

    ranked = []
    for node in cand.graph:
        if node.op_type in _QDQ_OPS or node.op_type == "Constant":
            continue
        outs = [sqnr_of(v) for v in node.outputs if v.name in tensors]
        outs = [s for s in outs if s is not None]
        if not outs:
            continue
        ins, names = [], []
        for v in node.inputs:
            if v is None or is_constant(v):
                continue
            src = float_source(v)
            s = sqnr_of(src)
            if s is not None:
                ins.append(s)
                names.append(src.name)
        out_s = min(outs)
        in_s = min(ins) if ins else math.inf
        drop = min(in_s, SQNR_CAP) - min(out_s, SQNR_CAP)
        added = noise_ratio(out_s) - noise_ratio(in_s)
        ranked.append(NodeDrift(node.name or f"<{node.op_type}>", node.op_type, out_s, in_s, drop, added,
                                [v.name for v in node.outputs if v.name in tensors], names))
    ranked.sort(key=lambda n: (-n.added_noise, -n.drop_db))
    return ranked


def noise_ratio(sqnr: float) -> float:
    """Noise power over signal power for an SQNR in dB (0 for inf; capped at ``SQNR_CAP``)."""
    if math.isnan(sqnr):
        return math.inf
    return 0.0 if sqnr >= SQNR_CAP else 10.0 ** (-sqnr / 10.0)


@contextlib.contextmanager
def _tapped_session(model: ir.Model, values: list[ir.Value], providers, threads):
    """A session of ``model`` with ``values`` added as graph outputs (the model is a private copy)."""
    present = set(model.graph.outputs)
    for v in values:
        if v not in present:
            model.graph.outputs.append(v)
            present.add(v)
    if not model_io.uses_external_data(model):
        yield runtime.make_session(model, providers, threads=threads)
        return
    path = _beside_weights(model)
    try:
        ir.save(model, path)  # external tensors keep their location: the same data file is read
        yield runtime.make_session(path, providers, threads=threads)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _beside_weights(model: ir.Model) -> Path:
    dirs = {t.base_dir for t in model_io.iter_initializer_tensors(model) if isinstance(t, ir.ExternalTensor)}
    if len(dirs) != 1:
        raise OutputError(f"external data lies in {len(dirs)} folders {sorted(map(str, dirs))}; "
                          "explain needs the weights in one folder")
    folder = Path(dirs.pop() or ".")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: explain writes a small tapped graph next to the weights, "
                          "but this folder is not writable; copy the model to a writable folder")
    return folder / f".onnxshrink-explain-{uuid.uuid4().hex[:8]}.onnx"


def _run(sess, names, feed, role: str) -> list[np.ndarray]:
    try:
        return sess.run(names, feed)
    except Exception as e:  # ORT raises its own exception types
        raise RuntimeFailure(f"the tapped {role} model failed to run: {e}") from e
