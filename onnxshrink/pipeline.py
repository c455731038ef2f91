"""The pass manager: an explicit, ordered list of passes and fixed-point groups, with instruments.

Steps come from the Python API, a named preset or a TOML recipe::

    [[step]]
    pass = "fold_constants"
    max_output_bytes = 1048576      # fields of the pass's Config

    [[step]]
    fixed_point = ["dead_code", "eliminate_identities"]
    max_iterations = 8
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxshrink.errors import ConfigError, PassFailure, ShrinkError
from onnxshrink.instruments import Instrument
from onnxshrink.pass_infra import PassStats, ShrinkPass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FixedPoint:
    """Run ``passes`` in order, again and again, until none changes the model (or ``max_iterations``)."""

    passes: list[ShrinkPass]
    max_iterations: int = 10


Step = ShrinkPass | FixedPoint


@dataclasses.dataclass
class PassRecord:
    name: str
    iteration: int
    seconds: float
    changed: bool
    stats: PassStats


@dataclasses.dataclass
class PipelineReport:
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    iterations: dict[str, int] = dataclasses.field(default_factory=dict)

    def per_pass(self) -> dict[str, dict]:
        """Totals per pass name: runs, seconds, counts, skipped nodes; ``left``: the patterns a rule
        found but could not rewrite at the model's opset (``gelu_needs_opset_20``), when any."""
        out: dict[str, dict] = {}
        for r in self.records:
            row = out.setdefault(
                r.name, {"runs": 0, "seconds": 0.0, "counts": {}, "skipped": []}
            )
            row["runs"] += 1
            row["seconds"] += r.seconds
            for k, v in r.stats.counts.items():
                row["counts"][k] = row["counts"].get(k, 0) + v
            row["skipped"].extend(str(s) for s in r.stats.skipped)
            left = {k: v for k, v in r.stats.notes.items() if "_needs_opset_" in k}
            if left:  # the patterns a rule left for want of an opset: as the last run saw them
                row["left"] = left
        for row in out.values():
            row["skipped"] = sorted(set(row["skipped"]))
        return out

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.records)

    def to_dict(self) -> dict:
        return {"passes": self.per_pass(), "fixed_point_iterations": self.iterations}


class Pipeline:
    """Runs steps in order on a model in place; instruments see the model after each changing pass."""

    def __init__(
        self,
        steps: Sequence[Step],
        instruments: Sequence[Instrument] = (),
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.steps = list(steps)
        self.instruments = list(instruments)
        self.progress = progress

    def run(self, model: ir.Model) -> PipelineReport:
        report = PipelineReport()
        for inst in self.instruments:
            inst.begin(model)
        for step in self.steps:
            if isinstance(step, FixedPoint):
                self._run_fixed_point(step, model, report)
            else:
                self._run_pass(step, model, report, 0)
        for inst in self.instruments:
            inst.end(model)
        return report

    def _run_fixed_point(self, group: FixedPoint, model: ir.Model, report: PipelineReport) -> None:
        key = "+".join(p.name for p in group.passes)
        for it in range(group.max_iterations):
            changed = False
            for p in group.passes:
                changed |= self._run_pass(p, model, report, it)
            report.iterations[key] = it + 1
            if not changed:
                return
        logger.warning("fixed point of %s not reached in %d iterations", key, group.max_iterations)

    def _run_pass(self, p: ShrinkPass, model: ir.Model, report: PipelineReport, it: int) -> bool:
        if self.progress:
            self.progress(p.name)
        t0 = time.perf_counter()
        try:
            result = p(model)
        except ShrinkError:
            raise
        except Exception as e:
            raise PassFailure(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - t0
        report.records.append(PassRecord(p.name, it, seconds, result.modified, result.stats))
        if result.modified:
            logger.info("%s: %s", p.name, dict(result.stats.counts))
            for inst in self.instruments:
                inst.after_pass(p, model, result)
        return result.modified


# ---------------------------------------------------------------- presets and recipes


def make_pass(name: str, **options) -> ShrinkPass:
    """Instantiate a registered pass by name with config options."""
    from onnxshrink.passes import REGISTRY

    if name not in REGISTRY:
        raise ConfigError(f"unknown pass {name!r}; known passes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


#: The lossless cleanup loop, in order. Repeated to a fixed point by the default preset.
LOSSLESS_PASSES = (
    "fold_constants",
    "eliminate_identities",
    "loop_invariants",
    "fuse_batchnorm",
    "fuse_conv_bias",
    "fuse_gemm",
    "cse",
    "dedup_initializers",
    "dead_code",
)


def lossless_steps() -> list[Step]:
    from onnxshrink.passes import REGISTRY

    return [FixedPoint([make_pass(n) for n in LOSSLESS_PASSES if n in REGISTRY])]


#: Passes only the ``default`` preset runs, in its loop after ``fuse_gemm``: fusions into ops that int8
#: kernels lack (HardSwish, HardSigmoid, Gelu, LayerNormalization), residual Adds kept out of ONNX
#: Runtime's slow CPU SkipLayerNormalization, and scalar scales sunk into weights. Quantization and
#: pruning run ``lossless_steps`` without them.
FLOAT_FUSION_PASSES = ("fuse_activations", "fuse_layernorm", "avoid_skip_layernorm", "fold_scalar_scales")


def default_steps() -> list[Step]:
    """The ``default`` preset: the lossless loop plus ``FLOAT_FUSION_PASSES``, to a fixed point; weights
    the model stores as float16 behind a Cast stay so (``fold_constants``' ``keep_float16_storage``)."""
    from onnxshrink.passes import REGISTRY

    at = LOSSLESS_PASSES.index("fuse_gemm") + 1
    names = (*LOSSLESS_PASSES[:at], *FLOAT_FUSION_PASSES, *LOSSLESS_PASSES[at:])
    options = {"fold_constants": {"keep_float16_storage": True}}
    return [FixedPoint([make_pass(n, **options.get(n, {})) for n in names if n in REGISTRY])]


def int8_steps() -> list[Step]:
    """The ``int8`` preset needs calibration data, which a step list cannot carry."""
    raise ConfigError(
        "preset 'int8' needs calibration data: run `onnxshrink optimize IN -o OUT --quantize int8 "
        "--calibration DATA` or onnxshrink.quantize(model, data, output) (lossless passes, then QDQ)"
    )


#: Cleanup before pruning: BatchNorm kept, so the ``bn`` criterion and BN re-estimation still see it.
PRE_PRUNE_PASSES = ("fold_constants", "eliminate_identities", "cse", "dead_code")


def pre_prune_steps() -> list[Step]:
    """The cleanup before pruning (``PRE_PRUNE_PASSES`` to a fixed point); also what the MACs count folds
    a copy with (``stats.inferred_shapes``)."""
    from onnxshrink.passes import REGISTRY

    return [FixedPoint([make_pass(n) for n in PRE_PRUNE_PASSES if n in REGISTRY])]


def prune_steps() -> list[Step]:
    """The ``prune`` preset: cleanup, data-free pruning of 30% of the channels (L1, widths rounded up
    to 8 or 16 for this CPU), then the lossless loop and ``avoid_skip_layernorm``. Other ratios, data
    criteria, reconstruction: ``optimize --prune RATIO`` or ``onnxshrink.prune(...)``."""
    return [*pre_prune_steps(), make_pass("prune_channels"), *after_prune_steps()]


def after_prune_steps() -> list[Step]:
    """What pruning runs on the pruned model: the lossless loop, then ``avoid_skip_layernorm`` (pruned
    transformers keep their layer norms, and ORT would fuse their residual Adds into its slow CPU
    SkipLayerNormalization once the shapes are static)."""
    return [*lossless_steps(), make_pass("avoid_skip_layernorm")]


#: Named presets. Each maps to a function returning fresh pass instances.
PRESETS: dict[str, Callable[[], list[Step]]] = {
    "default": default_steps,
    "int8": int8_steps,
    "prune": prune_steps,
}


def preset_steps(name: str) -> list[Step]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def steps_from_names(names: Sequence[str]) -> list[Step]:
    """Steps for ``--passes a,b,c``: each pass once, in the given order."""
    return [make_pass(n.strip()) for n in names if n.strip()]


def load_recipe(path: str | Path) -> list[Step]:
    """Parse a TOML recipe file into steps (see the module docstring for the format)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"recipe {path}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path}: not valid TOML: {e}") from e
    unknown = set(data) - {"step", "preset"}
    if unknown:
        raise ConfigError(f"recipe {path}: unknown keys {sorted(unknown)}; use [[step]] tables")
    steps = preset_steps(data["preset"]) if "preset" in data else []
    for i, entry in enumerate(data.get("step", [])):
        steps.append(_recipe_step(path, i, dict(entry)))
    if not steps:
        raise ConfigError(f"recipe {path}: no steps")
    return steps


def _recipe_step(path: Path, i: int, entry: dict) -> Step:
    if "pass" in entry and "fixed_point" in entry:
        raise ConfigError(f"recipe {path}: step {i + 1} has both 'pass' and 'fixed_point'")
    if "fixed_point" in entry:
        names = entry.pop("fixed_point")
        max_it = entry.pop("max_iterations", 10)
        if entry:
            raise ConfigError(f"recipe {path}: step {i + 1}: unknown keys {sorted(entry)}")
        return FixedPoint([make_pass(n) for n in names], max_iterations=int(max_it))
    if "pass" in entry:
        name = entry.pop("pass")
        try:
            return make_pass(name, **entry)
        except ConfigError as e:
            raise ConfigError(f"recipe {path}: step {i + 1}: {e}") from e
    raise ConfigError(f"recipe {path}: step {i + 1} needs 'pass' or 'fixed_point'")
