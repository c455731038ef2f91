"""Drift-budgeted mixed precision: keep the most sensitive quantized nodes float until a budget holds.

``search(float_model, build, candidates, data, budget)``:

1. builds the fully quantized model (``build(())``) and measures its drift on ``data`` against the float
   model: ``1 - cosine`` of each output flattened over all feeds (the worst output), and with a metric
   the task-score drop (``onnxshrink.task_metrics``: labels stored with the feeds);
2. within budget: done, nothing kept. Otherwise ranks the quantized nodes with ``explain`` (the noise
   each one adds, worst first; a dynamically quantized layer is measured from its float input);
3. finds the smallest ``k`` such that keeping the top ``k`` float meets the budget: ``k = 1, 2, 4, ...``
   until one holds, then bisection between the last failing and the first passing ``k``: about
   ``2 log2(k)`` builds, each measured (the model returned was measured to meet the budget).

Reference outputs are computed once and held (``max_feeds`` feeds at most). int16 activations are not
offered: ONNX Runtime 1.32's CPU EP runs int16 QDQ (opset 21) but fuses none of it, so a Conv with int16
Q/DQ ran 1.6x slower than float (``benchmarks/results/quantize_vs_ort.md``); keeping a node float is
cheaper and exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxshrink import data as data_mod
from onnxshrink import explain, runtime
from onnxshrink.errors import ConfigError
from onnxshrink.graph_utils import release_models
from onnxshrink.progress import make_progress
from onnxshrink.task_metrics import ScoreSum, load_metric
from onnxshrink.validate import cosine_from_sums

logger = logging.getLogger(__name__)

Build = Callable[[Sequence[str]], ir.Model]


@dataclasses.dataclass(frozen=True)
class Budget:
    """``max_drift``: largest ``1 - cosine`` allowed; ``max_metric_drop``: largest task-score drop."""

    max_drift: float | None = None
    max_metric_drop: float | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.max_drift is None and self.max_metric_drop is None:
            raise ConfigError("mixed precision needs max_drift or max_metric_drop")
        if self.max_drift is not None and not 0 <= self.max_drift <= 2:
            raise ConfigError(f"max_drift is 1 - cosine, in [0, 2]; got {self.max_drift}")
        if self.max_metric_drop is not None and self.metric is None:
            raise ConfigError("max_metric_drop needs a metric (e.g. metric='accuracy', labels with the data)")

    def holds(self, m: Measure) -> bool:
        ok = self.max_drift is None or m.drift <= self.max_drift
        return ok and (self.max_metric_drop is None or m.metric_drop <= self.max_metric_drop)


@dataclasses.dataclass
class Measure:
    kept: int
    drift: float
    metric_drop: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MixedReport:
    """What the search did: the budget, each evaluation, and the nodes kept float with their ranking."""

    budget: Budget
    evaluations: list[Measure]
    kept: list[dict]
    met: bool
    seconds: float
    final: Measure | None = None  # the measure of the model returned

    def to_dict(self) -> dict:
        return {"budget": dataclasses.asdict(self.budget), "met": self.met, "seconds": round(self.seconds, 2),
                "initial": self.evaluations[0].to_dict(), "final": self.final.to_dict() if self.final else None,
                "evaluations": [e.to_dict() for e in self.evaluations], "kept_float": self.kept}


class _Evaluator:
    """Drift (and, given a ``metric`` name, metric drop) of candidates against reference outputs
    computed once."""

    def __init__(self, reference: ir.Model, data, metric: str | None, providers, max_feeds: int) -> None:
        source = data_mod.feeds(data, reference, extras=("labels",))
        self.feeds, self.labels = [], []
        for i, (feed, extra) in enumerate(source.labeled()):
            if i >= max_feeds:
                break
            self.feeds.append(feed)
            self.labels.append(extra.get("labels"))
        self.providers = providers
        self.metric = load_metric(metric) if metric else None
        sess = runtime.make_session(reference, providers)
        self.names = [o.name for o in sess.get_outputs()]
        self.ref = [sess.run(self.names, f) for f in self.feeds]
        self.ref_score = self._score(self.ref) if self.metric else None

    def _score(self, outs) -> float:
        acc = ScoreSum(self.metric, "metric")
        for o, lab in zip(outs, self.labels):
            acc.add(dict(zip(self.names, o)), lab)
        return acc.mean()

    def __call__(self, model: ir.Model, kept: int) -> Measure:
        sess = runtime.make_session(model, self.providers)
        outs = [sess.run(self.names, f) for f in self.feeds]
        drift = 0.0
        for j in range(len(self.names)):
            dot = rr = cc = 0.0
            for r, c in zip(self.ref, outs):
                a = np.asarray(r[j], np.float64).ravel()
                b = np.asarray(c[j], np.float64).ravel()
                fin = np.isfinite(a) & np.isfinite(b)
                if not fin.all():
                    a, b = a[fin], b[fin]
                dot, rr, cc = dot + float(a @ b), rr + float(a @ a), cc + float(b @ b)
            drift = max(drift, 1.0 - cosine_from_sums(dot, rr, cc))
        drop = self.ref_score - self._score(outs) if self.metric else None
        return Measure(kept, drift, drop)


def drift(float_model: ir.Model, model: ir.Model, data, providers=None, max_feeds: int = 4) -> tuple[float, int]:
    """``1 - cosine`` (worst output) of ``model`` against ``float_model`` on the first ``max_feeds`` feeds
    of ``data``, the measure ``max_drift`` bounds; returns it and the number of feeds."""
    evaluate = _Evaluator(float_model, data, None, providers, max_feeds)
    return evaluate(model, 0).drift, len(evaluate.feeds)


def search(float_model: ir.Model, build: Build, candidates: Sequence[str], data, budget: Budget, *,
           dynamic: Sequence[str] = (), providers=None, max_feeds: int = 64, explain_batches: int = 8,
           progress: bool = False) -> tuple[ir.Model, MixedReport]:
    """The quantized model with the fewest top-ranked ``candidates`` kept float that meets ``budget``.

    ``build(names)``: the quantized model with those node names float. ``candidates``: names of the
    quantized nodes (static ones and ``dynamic`` linear layers). Returns the model and the report; when
    even every candidate float misses the budget, that model is returned and ``report.met`` is False.
    ``progress``: a bar on stderr, one step per model built and measured after the first (the search
    is a doubling then a bisection over the ranking: about 2 log2(len(candidates)) of them at most).
    """
    t0 = time.perf_counter()
    evaluate = _Evaluator(float_model, data, budget.metric, providers, max_feeds)
    model = build(())
    first = evaluate(model, 0)
    evals = [first]
    if budget.holds(first):
        return model, MixedReport(budget, evals, [], True, time.perf_counter() - t0, first)
    ranking = rank(float_model, model, data, candidates, set(dynamic), providers, explain_batches)
    names = [n.node for n in ranking]
    measures: dict[int, Measure] = {0: first}
    # The model of the search's current upper end only, the one it can still return: the smallest k
    # that holds, else every candidate float. Each other candidate is dropped once measured.
    upper: dict[int, ir.Model] = {0: model}

    bar = make_progress(progress, None, "keeping nodes float", "builds")

    def at(k: int) -> bool:
        if k not in measures:
            bar.update()
            m = build(names[:k])
            measures[k] = evaluate(m, k)
            evals.append(measures[k])
            logger.info("mixed precision: %d kept float -> drift %.3g", k, measures[k].drift)
            if budget.holds(measures[k]) or k == len(names):
                upper.clear()
                upper[k] = m
            del m
            release_models()
        return budget.holds(measures[k])

    lo, hi = 0, 1  # lo fails; find the first hi that holds
    while hi < len(names) and not at(hi):
        lo, hi = hi, min(2 * hi, len(names))
    hi = min(hi, len(names))
    met = at(hi) if names else False
    while met and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid) else (mid, hi)
    bar.close()
    best = hi if met else len(names)
    kept = [_kept_row(n) for n in ranking[:best]]
    if not met:
        logger.warning("mixed precision: the budget is not met even with all %d quantized nodes float", len(names))
    return upper[best], MixedReport(budget, evals, kept, met, time.perf_counter() - t0, measures[best])


def _kept_row(n: explain.NodeDrift) -> dict:
    def num(x):
        return x if math.isfinite(x) else str(x)

    if math.isnan(n.added_noise):
        return {"node": n.node, "op_type": n.op_type, "added_noise": "not ranked (subgraph or unmapped output)"}
    return {"node": n.node, "op_type": n.op_type, "added_noise": num(n.added_noise), "sqnr_db": num(n.sqnr_db),
            "input_sqnr_db": num(n.input_sqnr_db), "drop_db": num(n.drop_db)}


def rank(float_model: ir.Model, model: ir.Model, data, candidates: Sequence[str], dynamic: set[str], providers,
         batches: int) -> list[explain.NodeDrift]:
    """``explain``'s ranking restricted to ``candidates``, worst first; dynamic layers re-measured from
    their float input (``explain`` sees only their last node, whose inputs it cannot map); candidates it
    cannot rank follow in their given order, with NaN numbers."""
    order = list(candidates)
    candidates = set(order)
    report = explain.explain(float_model, model, data, providers=providers, batches=batches)
    by_name = {n.name: n for n in model.graph.all_nodes() if n.name}
    out = []
    for nd in report.nodes:
        if nd.node not in candidates:
            continue
        if nd.node in dynamic and nd.node in by_name:
            x = _dynamic_input(by_name[nd.node])
            t = report.tensors.get(x.name) if x is not None else None
            in_s = t.sqnr_db if t is not None and not t.problem else math.inf
            nd = dataclasses.replace(nd, input_sqnr_db=in_s, inputs=[x.name] if x is not None else [],
                                     added_noise=explain.noise_ratio(nd.sqnr_db) - explain.noise_ratio(in_s),
                                     drop_db=min(in_s, explain.SQNR_CAP) - min(nd.sqnr_db, explain.SQNR_CAP))
        out.append(nd)
    ranked = sorted(out, key=lambda n: (-n.added_noise, -n.drop_db))
    missing = [n for n in order if n in candidates and n not in {r.node for r in ranked}]
    if missing:  # inside subgraphs, or outputs explain cannot map: last, so the budget can always be met
        logger.info("mixed precision: %d quantized nodes could not be ranked (inside subgraphs, or no mapped "
                    "output); they come last: %s", len(missing), missing[:5])
    unknown = math.nan
    return ranked + [explain.NodeDrift(n, by_name[n].op_type if n in by_name else "?", unknown, unknown, unknown,
                                       unknown, [], []) for n in missing]


def _dynamic_input(last: ir.Node) -> ir.Value | None:
    """The float input of a dynamically quantized layer, found from its last node upwards (an int8 LSTM
    is one node reading it)."""
    if last.op_type == "DynamicQuantizeLSTM":
        return last.inputs[0]
    todo, seen = [last], set()
    while todo:
        n = todo.pop()
        if id(n) in seen or n.op_type not in _DYNAMIC_OPS:
            continue
        seen.add(id(n))
        if n.op_type == "DynamicQuantizeLinear":
            return n.inputs[0]
        todo.extend(v.producer() for v in n.inputs if v is not None and v.producer() is not None)
    return None


_DYNAMIC_OPS = ("Add", "Mul", "Cast", "MatMulInteger", "DynamicQuantizeLinear")
