"""Recovery after pruning, without training: least-squares refit and BatchNorm re-estimation.

``refit`` (He et al. 2017 / ThiNet): every consumer layer that lost input channels (Conv with group 1,
Gemm, MatMul with a constant weight and its bias Add) gets new weights and bias solving
``min ||[X' 1] W - Y||^2 + ridge`` where ``X'`` is the layer's input in the pruned model (unfolded into
patches for a Conv) and ``Y`` the same layer's output in the original model (kept output channels
only). Layers are refit in topological stages, so each stage sees inputs already corrected upstream.
Every refit is checked by 2-fold cross-validation over samples (each image, or each slice along the
input's leading axis, goes whole to one fold): a layer keeps its weights when the refit does not
predict the other fold's samples better. Where a layer has few rows per input feature (a
squeeze-excite layer sees one row per image), the ridge is chosen the same way (the given ridge times
1, 10, 100 or 1000).
Memory stays bounded: batches stream through ONNX Runtime and only ``X^T X`` and ``X^T Y`` are
accumulated per layer, never the activations (``onnxshrink.normal_eq``; while a layer has seen fewer
rows than it has inputs, the rows are kept instead, which is less, and solved in the dual). Each
stage runs only the nodes no earlier stage ran (``onnxshrink.segments``; the values later nodes
still need wait on disk, one feed at a time), so the work over all stages is linear in depth, not
stages x depth.

``reestimate_bn``: BatchNormalization nodes downstream of pruning get their statistics corrected by
the change pruning made to their input (stage by stage), measured on the calibration data in the
pruned and in the original model: ``mean += mean' - mean_orig``, ``var *= (var' + eps) / (var_orig + eps)``
per kept channel. The trained statistics stay where pruning changed nothing: replacing them with the
calibration data's own statistics (what this did before) moved every BN toward data unlike the
training set (a few synthetic text crops on PP-OCR; see the reading in
``benchmarks/results/prune_real.md``). A BN whose input has no twin in the original model gets the
measured statistics outright. Used on its own (``method="bn"``) or for the BNs after layers the
refit skipped.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink import segments
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import NameGen, const_array
from onnxshrink.importance import TapReader
from onnxshrink.normal_eq import Normal, one_blas_thread
from onnxshrink.reconstruct_layers import Layer, find_layers, gram_bytes, kept_axis, replace_const, stages
from onnxshrink.spill import Spill

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconstructReport:
    refit: list[dict] = dataclasses.field(default_factory=list)  # layer, rows, error before/after
    bn: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    passes: int = 0  # passes over the calibration data

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reconstruct(original: ir.Model, pruned: ir.Model, kept: dict, feeds, *, method: str = "lsq",
                ridge: float = 1e-3, max_rows: int = 4096, seed: int = 0, progress=None) -> ReconstructReport:
    """Recover ``pruned`` (changed in place) toward ``original`` on calibration ``feeds``.

    ``kept``: value name -> axis -> kept indices (the pass's ``stats.notes["kept"]``). ``method``:
    ``lsq`` (refit, then BN re-estimation where no refit covered it) or ``bn`` (BN re-estimation only).
    ``max_rows``: rows (patch positions or tokens) sampled per batch and layer, bounding the cost.
    ``progress``: a bar on stderr (True) or ``fn(done, total)`` over the feeds read, every pass.
    """
    from onnxshrink.progress import make_progress

    if method not in ("lsq", "bn"):
        raise ConfigError(f"reconstruction method must be 'lsq' or 'bn', not {method!r}")
    source = data_mod.feeds(feeds, pruned)
    if source.random:
        logger.warning("reconstruction on random data fits noise; give calibration data")
    report = ReconstructReport()
    layers, skipped = find_layers(pruned, kept)
    report.skipped.extend(skipped)
    refits = stages(pruned, layers) if method == "lsq" else []  # structure only: refits change weights
    refits = [chunk for stage in refits for chunk in _within_budget(stage)]
    refit_done = {layer.node for stage in refits for layer in stage}
    bns = _bns_to_reestimate(pruned, kept, refit_done, everything=(method == "bn"))
    bn_layers = [Layer(n, n.inputs[0], n.outputs[0]) for n in bns]
    bn_stages = stages(pruned, bn_layers)
    passes = len(refits) + len(bn_stages) + bool(bn_layers)
    bar = make_progress(progress, passes * source.count if source.count else None, "reconstructing", unit="feeds")
    source = source.ticking(bar.update)
    job = _Job(pruned, kept, source, report, NameGen(pruned), _twins(original), Spill())
    try:
        with job.spill, segments.reader(pruned) as now, segments.reader(original) as then:
            for stage in refits:
                _refit_stage(job, now, then, stage, ridge, max_rows, seed)
        was = _original_moments(original, bn_layers, job.twins, source, report)
        with segments.reader(pruned) as now:
            for stage in bn_stages:
                _bn_stage(job, now, stage, was)
    finally:
        bar.close()
    return report


@dataclasses.dataclass
class _Job:
    """What the stages of one reconstruction share (one name generator: scanning the model's names
    per stage made the stages quadratic in the model's size)."""

    pruned: ir.Model
    kept: dict
    source: object
    report: ReconstructReport
    names: NameGen
    twins: dict[str, ir.Value]
    spill: Spill  # refit weights out of anonymous memory until the model is saved


#: The normal equations of a stage's layers are accumulated together, in one pass over the data: a
#: stage whose layers' Gram halves (2 x inputs squared x 8 bytes each) would pass this is split into
#: passes that each stay under it (a layer over it alone gets a pass of its own). The layers of one
#: stage do not feed each other, so a later pass reads the same inputs (from ``segments``' frontier).
STAGE_BUDGET = 2 << 30


def _within_budget(stage: list[Layer], budget: int | None = None) -> list[list[Layer]]:
    """``stage`` as consecutive chunks whose Gram estimates stay within ``budget`` (``STAGE_BUDGET``)."""
    budget = STAGE_BUDGET if budget is None else budget
    chunks: list[list[Layer]] = [[]]
    held = 0
    for layer in stage:
        size = 2 * gram_bytes(layer.node)  # one per cross-validation half
        if chunks[-1] and held + size > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(layer)
        held += size
    return chunks


def _refit_stage(job: _Job, now, then, stage: list[Layer], ridge, max_rows, seed) -> None:
    """Refit the layers of ``stage``: their inputs read in the pruned model (``now``), their targets in
    the original (``then``), one pass over the data."""
    report, kept = job.report, job.kept
    targets = [job.twins.get(layer.target.name) for layer in stage]
    ok = [(layer, t) for layer, t in zip(stage, targets) if t is not None]
    for layer, t in zip(stage, targets):
        if t is None:
            report.skipped.append(f"{layer.name}: no twin of its output in the original model")
    if not ok:
        return
    rng = np.random.default_rng(seed)
    normals = [Normal() for _ in ok]
    x_vals = [layer.x for layer, _ in ok]
    y_vals = [t for _, t in ok]
    read_x, read_y = now.begin(x_vals), then.begin(y_vals)
    seen = [0] * len(ok)  # samples each layer has seen, so folds alternate across feeds
    for i, feed in enumerate(job.source):
        xs, ys = read_x(i, feed), read_y(i, feed)
        with one_blas_thread():
            for j, ((layer, _), ne, x, y) in enumerate(zip(ok, normals, xs, ys)):
                feats, rows = layer.features(x), layer.targets(y, kept)
                fold, seen[j] = _folds(len(rows), x, seen[j], rng)
                if len(rows) > max_rows:
                    pick = rng.choice(len(rows), max_rows, replace=False)
                    feats, rows, fold = feats[pick], rows[pick], fold[pick]
                ne.add(np.ascontiguousarray(feats, np.float32), np.ascontiguousarray(rows, np.float32), fold)
    read_x.finish()
    read_y.finish()
    report.passes += 1
    for (layer, _), ne in zip(ok, normals):
        if not ne.finite():
            report.skipped.append(f"{layer.name}: its input or original output is not finite (Inf or NaN) "
                                  "on the calibration data; weights kept")
            continue
        w, before, after = ne.solve(ridge, layer.current_solution(), layer.fit_bias)
        if ne.ridge is not None and after <= before:
            layer.write(job.pruned, w, job.names, job.spill)
        report.refit.append({"layer": layer.name, "rows": ne.rows, "mse_before": before,
                             "mse_after": min(after, before), "ridge": ne.ridge})


def _folds(rows: int, x: np.ndarray, seen: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The fold (0/1) of each of a batch's ``rows``: by sample, the slices of ``x`` along its leading
    axis, when the rows come sample by sample (Conv patches, MatMul rows); else (a transposed Gemm
    input) at random. Returns the folds and the samples seen after this batch."""
    n = x.shape[0] if x.ndim else 1
    if n and rows % n == 0:
        return ((seen + np.arange(rows) // (rows // n)) % 2).astype(np.int8), seen + n
    return rng.integers(0, 2, rows).astype(np.int8), seen + 1


def _twins(original: ir.Model) -> dict[str, ir.Value]:
    """Node output name -> the value of that name in the original model (a layer's twin)."""
    return {out.name: out for node in original.graph for out in node.outputs if out.name}


# ---------------------------------------------------------------- BatchNorm re-estimation


def _bns_to_reestimate(model: ir.Model, kept: dict, refit_done: set, everything: bool) -> list[ir.Node]:
    changed = _downstream_of_pruning(model, kept)
    out = []
    for node in model.graph:
        if node.op_type != "BatchNormalization" or node.inputs[0] not in changed:
            continue
        prod = node.inputs[0].producer()
        if everything or prod is None or prod not in refit_done:
            if any(const_array(v) is None for v in node.inputs[1:5]):
                continue
            out.append(node)
    return out


def _downstream_of_pruning(model: ir.Model, kept: dict) -> set:
    changed = set()
    for node in model.graph:  # topological order
        ins = [v for v in node.inputs if v is not None]
        if any(v in changed or (v.name in kept and v.const_value is None) for v in ins):
            changed.update(node.outputs)
    return changed


class _Moments:
    """Per-channel (axis 1) running sums of one activation: mean and variance over the other axes."""

    def __init__(self) -> None:
        self.s = self.sq = 0.0
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        moved = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).astype(np.float64)
        self.s = self.s + moved.sum(0)
        self.sq = self.sq + (moved**2).sum(0)
        self.n += len(moved)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / max(self.n, 1)
        return mean, np.maximum(self.sq / max(self.n, 1) - mean**2, 0.0)


def _original_moments(original: ir.Model, layers: list[Layer], names: dict, source, report) -> dict:
    """BN node -> moments of the twin of its input in the original model (one pass for all BNs; the
    original does not change), or None where the original has no such value."""
    twins = {layer.node: names.get(layer.x.name) for layer in layers}
    have = [(node, t) for node, t in twins.items() if t is not None]
    moments = {node: _Moments() for node, _ in have}
    if have:
        read = TapReader(original, [t for _, t in have])
        for feed in source:
            for (node, _), y in zip(have, read(feed)):
                moments[node].add(y)
        report.passes += 1
    return {node: moments.get(node) for node in twins}


def _bn_stage(job: _Job, reader, stage: list[Layer], was: dict) -> None:
    read = reader.begin([layer.x for layer in stage])
    now = [_Moments() for _ in stage]
    for i, feed in enumerate(job.source):
        for m, x in zip(now, read(i, feed)):
            m.add(x)
    read.finish()
    report = job.report
    report.passes += 1
    for layer, m in zip(stage, now):
        mean, var = _corrected(layer, job.kept, m, was.get(layer.node))
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            report.skipped.append(f"{layer.name}: its input is not finite (Inf or NaN) on the calibration "
                                  "data; BatchNorm statistics kept")
            continue
        for idx, arr in ((3, mean), (4, var)):
            replace_const(job.pruned, layer.node, idx, arr, job.names)
        report.bn.append(layer.name)


def _corrected(layer: Layer, kept: dict, now: _Moments, was: _Moments | None) -> tuple[np.ndarray, np.ndarray]:
    """The BN's trained mean and variance moved by the change measured between the original input
    (``was``, its kept channels) and the pruned one (``now``); ``now`` itself without a twin."""
    mean_p, var_p = now.mean_var()
    node = layer.node
    trained = [const_array(node.inputs[i]) for i in (3, 4)]
    if was is None or any(t is None or t.shape != mean_p.shape for t in trained):
        return mean_p, var_p
    mean_o, var_o = was.mean_var()
    idx = kept_axis(kept, layer.x, 1)
    if idx is not None:
        mean_o, var_o = mean_o[idx], var_o[idx]
    if mean_o.shape != mean_p.shape:
        return mean_p, var_p
    eps = node.attributes.get("epsilon")
    eps = eps.as_float() if eps is not None else 1e-5
    rm, rv = (t.astype(np.float64) for t in trained)
    return rm + (mean_p - mean_o), np.maximum(rv * (var_p + eps) / (var_o + eps), 0.0)
