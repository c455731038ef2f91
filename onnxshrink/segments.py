"""Read a model's values stage by stage, each stage running only the nodes no earlier stage ran.

Least-squares reconstruction refits layers in topological stages: stage k's inputs must come from the
model with the stages before it already refit. A tap model per stage that runs every node up to the
stage (``importance.TapReader``) costs stages x depth, quadratic in depth: 80 s for 100 residual blocks
against 5 s here (``benchmarks/results/reconstruct_scale.md``), the time going to cloning, serializing
and loading one tap model per stage. Here a stage
builds a *segment*: the ancestors of the values it asks for that no earlier stage ran, as a small model
whose inputs are the graph inputs and the values earlier segments computed for nodes not yet run (the
frontier). Each feed's frontier waits on disk between stages (one ``.npy`` per value, in a temporary
folder), so memory holds one feed's arrays at a time, whatever the number of feeds; the work and the
model building over all stages are linear in the model's size. The disk it takes is bounded
(``max_bytes``: 2 GiB, or a quarter of the free space): past it, the later stages read with tap models.

The caller may change the constant inputs of nodes not yet run between stages (that is what a refit
does); a node that has run must not change. Feeds must come in the same order at every stage. A model
whose main graph holds control flow (If/Loop/Scan, whose bodies read outer values) is read with one
tap model per stage instead (:func:`reader`).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink.errors import PassFailure
from onnxshrink.graph_utils import subgraphs_of

logger = logging.getLogger(__name__)


def reader(model: ir.Model, providers=None):
    """A :class:`SegmentedReader` for ``model``, or a :class:`TapStages` where segments cannot serve."""
    if any(subgraphs_of(node) for node in model.graph):
        return TapStages(model, providers)
    try:
        return SegmentedReader(model, providers)
    except OSError as e:  # no writable temp folder: recompute instead of keeping values on disk
        logger.info("no temporary folder for the values kept between stages (%s); every stage runs the "
                    "model from its inputs", e)
        return TapStages(model, providers)


class TapStages:
    """The same interface over one trimmed tap model per stage (``importance.TapReader``)."""

    def __init__(self, model: ir.Model, providers=None) -> None:
        self.model, self.providers = model, providers

    def begin(self, values: list[ir.Value]):
        from onnxshrink.importance import TapReader

        read = TapReader(self.model, values, self.providers)
        return _Stage(lambda i, feed: read(feed), lambda: None)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stage:
    """``stage(i, feed)``: the arrays of the stage's values for feed ``i``; ``finish()`` after the last."""

    def __init__(self, run, finish) -> None:
        self._run, self.finish = run, finish

    def __call__(self, i: int, feed: dict) -> list[np.ndarray]:
        return self._run(i, feed)


class SegmentedReader:
    """Stage-by-stage reader of ``model``'s values (see the module doc). Use as a context manager (the
    frontier's folder is removed on exit), ``begin(values)`` per stage."""

    def __init__(self, model: ir.Model, providers=None, threads: int = 1, max_bytes: int | None = None) -> None:
        self.model, self.providers, self.threads = model, providers, threads
        self.done: set[ir.Node] = set()
        self.frontier: dict[ir.Value, int] = {}  # cached value -> file id
        self.dtypes: dict[ir.Value, np.dtype] = {}
        self._ids = itertools.count()
        self._feeds = 0
        self._dir = Path(tempfile.mkdtemp(prefix="onnxshrink-frontier-"))
        self.max_bytes = _default_budget(self._dir) if max_bytes is None else max_bytes
        self._sizes: dict[int, int] = {}  # file id -> bytes on disk over all feeds
        self._fallback: TapStages | None = None  # once the frontier outgrew max_bytes
        self._order = {n: i for i, n in enumerate(model.graph)}

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ planning a segment

    def _segment_nodes(self, values) -> list[ir.Node]:
        """Nodes not yet run that ``values`` need, in graph order."""
        need, todo = set(), [v.producer() for v in values]
        while todo:
            node = todo.pop()
            if node is None or node in need or (node in self.done and not _constant(node)):
                continue
            need.add(node)
            todo.extend(v.producer() for v in node.inputs if v is not None)
        if all(n in self._order for n in need):  # sorting the few, not scanning the graph per stage
            return sorted(need, key=self._order.__getitem__)
        self._order = {n: i for i, n in enumerate(self.model.graph)}  # nodes were added since
        return sorted(need, key=self._order.__getitem__)

    def begin(self, values: list[ir.Value]) -> _Stage:
        if self._fallback is not None:
            return self._fallback.begin(values)
        nodes = self._segment_nodes(values)
        ran = self.done | set(nodes)
        made = [v for n in nodes for v in n.outputs]
        keep = {v for v in [*self.frontier, *made]  # a Constant node runs again where it is needed
                if not _constant(v.producer()) and (v.is_graph_output() or any(u.node not in ran for u in v.uses()))}
        new = [v for v in made if v in keep]
        made_set = set(made)
        outputs = list(dict.fromkeys([*(v for v in values if v in made_set), *new]))
        reads = _free_inputs(nodes)
        cached_in = [v for v in reads if v in self.frontier]
        wanted_cached = [v for v in values if v in self.frontier and v not in cached_in]
        session = self._session(nodes, reads, outputs) if outputs else None
        ids = {v: self.frontier.get(v) for v in [*cached_in, *wanted_cached]}
        new_ids = {v: next(self._ids) for v in new}
        seen, over = [0], [False]

        def run(i: int, feed: dict) -> list[np.ndarray]:
            env: dict[ir.Value, np.ndarray] = {v: np.load(self._file(i, ids[v])) for v in ids}
            if session is not None:
                inputs = {v.name: env[v] if v in env else feed[v.name] for v in reads}
                env.update(zip(outputs, session.run([v.name for v in outputs], inputs)))
            size = sum(env[v].nbytes for v in new_ids)
            over[0] = over[0] or sum(self._sizes.values()) + size > self.max_bytes
            for v, k in new_ids.items():
                self.dtypes[v] = env[v].dtype
                if not over[0]:  # over budget: this stage still returns its values, and is the last saved
                    np.save(self._file(i, k), env[v])
                    self._sizes[k] = self._sizes.get(k, 0) + env[v].nbytes
            seen[0] = max(seen[0], i + 1)
            missing = [v.name for v in values if v not in env and v.name not in feed]
            if missing:
                raise PassFailure(f"reconstruction: values {missing} were computed by an earlier stage and not "
                                  "kept; please report this model")
            return [env[v] if v in env else feed[v.name] for v in values]

        def finish() -> None:
            self._feeds = max(self._feeds, seen[0])
            if over[0]:
                self._overflow()
                return
            self.done |= set(nodes)
            for v, k in self.frontier.items():
                if v not in keep:
                    for i in range(self._feeds):
                        self._file(i, k).unlink(missing_ok=True)
                    self._sizes.pop(k, None)
            self.frontier = {v: self.frontier.get(v, new_ids.get(v)) for v in keep}

        return _Stage(run, finish)

    def _overflow(self) -> None:
        """The frontier outgrew ``max_bytes``: drop it; later stages read with tap models (each runs the
        model from its inputs up to the stage: quadratic in depth again, with bounded disk)."""
        logger.info("the values kept between stages would pass %d bytes on disk; later stages run the model "
                    "from its inputs", self.max_bytes)
        for path in self._dir.iterdir():
            path.unlink(missing_ok=True)
        self._sizes.clear()
        self.frontier.clear()
        self._fallback = TapStages(self.model, self.providers)

    def _file(self, i: int, k: int) -> Path:
        return self._dir / f"{i}_{k}.npy"

    # ------------------------------------------------------------ the segment model

    def _session(self, nodes, reads, outputs):
        from onnxshrink import runtime

        graph_inputs, inits, mapping = [], [], {}
        for v in reads:
            if v.is_graph_input():
                mapping[v] = ir.Value(name=v.name, type=v.type, shape=v.shape)
            else:
                dtype = self.dtypes.get(v)
                mapping[v] = ir.Value(name=v.name, type=ir.TensorType(ir.DataType.from_numpy(dtype))
                                      if dtype is not None else v.type)
            graph_inputs.append(mapping[v])
        copies = []
        for node in nodes:
            ins = []
            for v in node.inputs:
                if v is not None and v not in mapping and v.producer() is None:  # an initializer
                    mapping[v] = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
                    inits.append(mapping[v])
                ins.append(mapping[v] if v is not None else None)
            copy = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()),
                           overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                           name=node.name)
            for old, out in zip(node.outputs, copy.outputs):
                out.name, out.type, out.shape = old.name, old.type, old.shape
                mapping[old] = out
            copies.append(copy)
        graph = ir.Graph(graph_inputs, [mapping[v] for v in outputs], nodes=copies, initializers=inits,
                         opset_imports=dict(self.model.opset_imports), name="segment")
        segment = ir.Model(graph, ir_version=self.model.ir_version, functions=list(self.model.functions.values()))
        rt = runtime.ort()
        so = runtime.session_options(self.threads, level=rt.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        return runtime.make_session(segment, self.providers, options=so)


def _default_budget(folder: Path) -> int:
    """Disk the frontier may take: 2 GiB, or a quarter of the free space where that is less."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover - a folder just made
        free = 8 << 30
    return min(2 << 30, free // 4)


def _constant(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.inputs


def _free_inputs(nodes: list[ir.Node]) -> list[ir.Value]:
    """Values ``nodes`` read that none of them makes and that are not constants: the segment's inputs
    (graph inputs, and values earlier segments computed). An initializer that is also a graph input
    counts as a constant (its default)."""
    made = {v for n in nodes for v in n.outputs}
    out = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v not in made and v.const_value is None \
                    and (v.producer() is not None or v.is_graph_input()):
                out[v] = None
    return list(out)
