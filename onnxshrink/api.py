"""The Python API: ``optimize`` a model with a preset, a pass list or a recipe."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from onnxshrink import model_io, pipeline, stats
from onnxshrink.errors import ConfigError
from onnxshrink.instruments import DriftProbe, Instrument, StructuralCheck

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OptimizeResult:
    model: ir.Model
    report: pipeline.PipelineReport
    before: dict
    after: dict
    seconds: float
    output: Path | None = None
    input_problems: list[str] = dataclasses.field(default_factory=list)
    opset_upgraded_from: int | None = None  # the input's opset when ``opset`` upgraded it

    def to_dict(self) -> dict:
        return {
            "output": str(self.output) if self.output else None,
            "seconds": self.seconds,
            "before": self.before,
            "after": self.after,
            "input_problems": self.input_problems,
            "opset_upgraded_from": self.opset_upgraded_from,
            **self.report.to_dict(),
        }


def resolve_steps(
    preset: str | None = None,
    passes: Sequence[str] | None = None,
    recipe: str | os.PathLike | None = None,
) -> list[pipeline.Step]:
    given = [x is not None for x in (preset, passes, recipe)]
    if sum(given) > 1:
        raise ConfigError("give only one of preset, passes or recipe")
    if passes is not None:
        return pipeline.steps_from_names(passes)
    if recipe is not None:
        return pipeline.load_recipe(recipe)
    return pipeline.preset_steps(preset or "default")


def optimize(
    model: model_io.ModelSource,
    output: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    passes: Sequence[str] | None = None,
    recipe: str | os.PathLike | None = None,
    steps: Sequence[pipeline.Step] | None = None,
    check: bool = True,
    check_each: bool = False,
    probe_feeds=None,
    instruments: Sequence[Instrument] = (),
    overwrite_input: bool = False,
    progress=None,
    dims: Mapping[str, int] | None = None,
    opset: int | None = None,
) -> OptimizeResult:
    """Run passes on ``model`` (a path, bytes, proto or ``ir.Model``, rewritten in place if an
    ``ir.Model``) and write it to ``output`` when given.

    ``check`` runs the structural check after each changing pass; ``check_each`` also compares ONNX
    Runtime outputs after each changing pass on a probe batch (``probe_feeds`` or random data).
    ``dims``: input dims (dim name or ``input:axis`` -> size) the MACs before and after are counted at;
    symbolic dims not given count as 1. ``opset``: convert the model to this default-domain opset first
    (``onnx.version_converter``; never down), so rules that need a newer op can fire: ``Gelu`` (20),
    ``LayerNormalization`` (17), ``HardSwish`` (14); an ``ir.Model`` given is then converted as a copy
    and rewritten there (``result.model``), not in place.
    """
    t0 = time.perf_counter()
    in_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    model_io.check_output(output, protected=(in_path,) if in_path else (), overwrite_input=overwrite_input)
    ir_model = model_io.load(model)
    before = stats.summarize(ir_model, in_path, dims=dims)
    upgraded = None
    if opset is not None:
        current = model_io.default_opset(ir_model)
        if current is not None and current > opset:
            raise ConfigError(f"the model has opset {current}, above the {opset} asked: onnxshrink converts "
                              "opsets up, never down")
        ir_model, upgraded = model_io.upgrade_opset(ir_model, opset, "the opset asked (--opset)")
    if steps is None:
        steps = resolve_steps(preset, passes, recipe)
    insts: list[Instrument] = list(instruments)
    structural = StructuralCheck() if check else None
    if structural:
        insts.insert(0, structural)
    if check_each:
        insts.append(DriftProbe(probe_feeds))
    report = pipeline.Pipeline(steps, insts, progress=progress).run(ir_model)
    out_path = None
    if output is not None:
        out_path = model_io.save(
            ir_model, output, protected=(in_path,) if in_path else (), overwrite_input=overwrite_input
        )
    after = stats.summarize(ir_model, out_path, dims=dims)
    return OptimizeResult(
        ir_model,
        report,
        before,
        after,
        time.perf_counter() - t0,
        out_path,
        structural.input_problems if structural else [],
        upgraded,
    )
