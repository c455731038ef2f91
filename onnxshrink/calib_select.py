"""``method="auto"``: choose the calibration ranges (and bias correction) per model by measured drift.

No range method wins everywhere (``benchmarks/results/quantize_vs_ort.md``): min/max keeps outliers
exact but coarsens every step (PP-OCR's recognizer: held-out drift 0.0227 with min/max, 0.0165 with
the 99.999th percentile), clipping hurts where the tails carry the signal (digits inception: 0.00036 vs
0.00055), and empirical bias correction helps some models (digits MLP: 4.7e-5 -> 3.0e-5) and not others.
So ``quantize`` calibrates once with histograms (``calibration.calibrate_methods``: they also hold the
exact extremes, so min/max costs no second run), and ``select`` builds the quantized model with each
``CANDIDATES`` entry for the tuned placement, measures ``1 - cosine`` of all float outputs against the
float model over up to ``FEEDS`` calibration feeds, and keeps the lowest. Candidates are tried in order
of simplicity; a later one must be at least ``MIN_GAIN`` lower in drift than the best so far to replace
it (ties and measurement noise keep the simpler configuration). The feeds are calibration feeds, so the
measure favours min/max a little (it never clips what it measured); measured on the benchmark's
held-out feeds the choice agreed (PP-OCR recognizer and classifier, digits MLP).

Where this CPU's int8 kernels saturate 8-bit weights (``ort_int8``) and the caller left the weight
encoding open, the candidates are built once more with pair-safe weights instead of 7-bit ones
(``_qdq_math.pair_safe_scale``: up to 8 bits, never clipped) and judged by the same rule. Neither wins
everywhere (``benchmarks/bench_pair_safe.py``, ``results/pair_safe_avx2.md``: held-out drift with every
node int8 and each encoding). Their bias shifts are measured anew, since they come from the weights' rounding.
"""

from __future__ import annotations

import dataclasses
import logging

from onnxshrink.graph_utils import release_models
from onnxshrink.progress import make_progress
from onnxshrink.validate import FeedsDrift

logger = logging.getLogger(__name__)

#: (range method, bias correction), simplest first.
CANDIDATES = (("minmax", False), ("percentile", False), ("minmax", True), ("percentile", True))
#: Range methods ``quantize(method="auto")`` calibrates (one histogram run answers both).
METHODS = ("minmax", "percentile")
#: Calibration feeds the drift is measured on.
FEEDS = 8
#: A candidate replaces the best so far when its drift is below (1 - MIN_GAIN) x the best's.
MIN_GAIN = 0.02


@dataclasses.dataclass
class Selection:
    """What ``select`` measured: per candidate its drift; ``method`` / ``bias_correction`` / ``pair_safe``
    were kept."""

    method: str
    bias_correction: bool
    tried: list[dict]
    feeds: int
    pair_safe: bool = False

    def label(self) -> str:
        return (f"auto: {self.method}" + (" + bias correction" if self.bias_correction else "")
                + (" + pair-safe weights" if self.pair_safe else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def select(make_builder, tables: dict, data, *, bias_correction: bool | None = None, providers=None,
           feeds: int = FEEDS, pair_safe: bool = False, progress: bool = False):
    """``(builder, model, Selection)`` of the candidate with the lowest drift.

    ``make_builder(table, bias_correction, pair_safe)`` returns a ``recovery.Builder``; ``tables`` maps
    each method of ``METHODS`` to its calibration table. ``bias_correction``: None tries both, True/False
    only that. Bias shifts are measured once per weight encoding and reused: a shift is the weight
    rounding error times the float input, the same for every activation range but for the int32 bias
    rounding (half a bias step at most). ``pair_safe``: every candidate is tried with pair-safe weights
    too, after the 7-bit ones (see the module docstring); the first corrected 7-bit build measures the
    pair-safe shifts in the same probe session (``bias_correction.measure_sets``), from a pair-safe build
    made then, which is kept as that candidate when it is one. ``progress``: a bar on stderr, one step
    per candidate judged."""
    chosen = None
    tried: list[dict] = []
    judge = None
    encodings = (False, True) if pair_safe else (False,)
    candidates = [(m, bc) for m, bc in CANDIDATES if bias_correction is None or bc == bias_correction]
    bar = make_progress(progress, len(encodings) * len(candidates), "choosing calibration", "candidates")
    measured: dict[bool, tuple] = {}  # per encoding: (shifts, correction)
    built: dict[tuple, tuple] = {}  # pair-safe builds made early for the joint measurement: (builder, model)
    for safe in encodings:
        for method, bc in candidates:
            if safe and (method, bc) in built:
                builder, model = built.pop((method, bc))
            else:
                builder, model = _build(make_builder, tables, (method, bc, safe), pair_safe, candidates,
                                        measured, built)
            if judge is None:
                judge = FeedsDrift(builder.float_model, data, feeds, providers)
            drift = judge(model)
            keep = chosen is None or drift < (1 - MIN_GAIN) * chosen[2]
            tried.append({"method": method, "bias_correction": bc, **({"pair_safe": True} if safe else {}),
                          "drift": drift, "kept": keep})
            if keep:
                chosen = (builder, model, drift, (method, bc, safe))
            del builder, model
            release_models()  # the candidate that lost (or the best it replaced)
            bar.update()
    bar.close()
    builder, model, _, (method, bc, safe) = chosen
    selection = Selection(method, bc, tried, judge.n, safe)
    logger.info("calibration %s on %d feeds; tried %s", selection.label(), judge.n, tried)
    return builder, model, selection


def _build(make_builder, tables: dict, candidate: tuple, pair_safe: bool, candidates: list, measured: dict,
           built: dict) -> tuple:
    """``(builder, model)`` of ``candidate`` (method, bias correction, pair-safe), with the bias shifts
    ``measured`` for its encoding when there are some. The first corrected 7-bit build, when pair-safe
    weights are tried, also measures theirs: from a pair-safe build made now, left in ``built`` when it
    is one of the ``candidates``. Records what it measured in ``measured``."""
    method, bc, safe = candidate
    builder = make_builder(tables[method], bc, safe)
    if bc and safe in measured:
        builder.shifts, builder.correction = measured[safe]
    elif bc and pair_safe and not safe:  # measure the pair-safe shifts in the same probe
        other = make_builder(tables[method], False, True)
        builder.joint = other()
        if (method, False) in candidates:
            built[(method, False)] = (other, builder.joint)
    model = builder()
    if bc and safe not in measured:
        measured[safe] = (builder.shifts, builder.correction)
        if builder.joint_shifts is not None:
            measured[True] = builder.joint_shifts
    return builder, model
