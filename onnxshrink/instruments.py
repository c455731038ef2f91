"""Instruments run around passes, outside them: structural checks, a drift probe, model dumps.

Each instrument has ``begin(model)``, ``after_pass(pass_, model, result)`` and ``end(model)``. The
pipeline calls ``after_pass`` only when the pass changed the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxshrink import checks, data, model_io, runtime
from onnxshrink.errors import CheckFailure, DriftFailure
from onnxshrink.pass_infra import ShrinkPass, ShrinkResult

logger = logging.getLogger(__name__)


class Instrument:
    def begin(self, model: ir.Model) -> None:
        pass

    def after_pass(self, pass_: ShrinkPass, model: ir.Model, result: ShrinkResult) -> None:
        pass

    def end(self, model: ir.Model) -> None:
        pass


class StructuralCheck(Instrument):
    """Topological order, onnx checker and strict shape inference after every pass that changed the model.

    Checks the input first: a check the input already fails is reported once and not held against
    the passes (real exported models sometimes fail strict shape inference). A graph output whose
    declared shape contradicts what inference proves once a pass has made more of the graph known
    (ddddocr's recognizer declares [1, seqlen] for a rank-3 Reshape output; ONNX Runtime returns
    the real shape and warns) is a wrong declaration of the input: it is replaced by the inferred
    shape, with a warning, and listed in ``input_problems``.
    """

    def __init__(self, warn_input: bool = True) -> None:
        """``warn_input=False``: log the input's failed checks at INFO (a job that builds many candidates
        from one input, which it has already checked and warned about once)."""
        self.warn_input = warn_input
        self.run_checker = True
        self.run_shapes = True
        self.input_problems: list[str] = []
        self._begun = False

    def begin(self, model: ir.Model) -> None:
        if self._begun:  # a later run of the same job (prune: cleanup, pruning, lossless) starts from our output
            return
        self._begun = True
        report = checks.check_structure(model)
        if report.shapes and not report.checker:
            report = self._fix_subgraph_shapes(model, report)
        if report.checker:
            self.run_checker = False
        if report.shapes:
            self.run_shapes = False
        for p in (report.checker, report.shapes):
            if p:
                logger.log(logging.WARNING if self.warn_input else logging.INFO,
                           "the input model already fails a check, which is skipped: %s", p)
                self.input_problems.append(f"{p} (the input already fails this check; skipped for the passes)")

    def after_pass(self, pass_, model, result) -> None:
        self.after_step(f"pass {pass_.name!r}", model)

    def after_step(self, step: str, model: ir.Model) -> None:
        """The same checks after a rewrite that is not a pass (pruning's reconstruction); ``step`` names it."""
        report = checks.check_structure(model, checker=self.run_checker, shapes=self.run_shapes)
        if report.shapes and not report.topo and not report.checker and self._fix_outputs(step, model):
            report = checks.check_structure(model, checker=self.run_checker, shapes=self.run_shapes)
        if not report:
            raise CheckFailure(f"{step} left an invalid model: " + "; ".join(report.problems[:5]))

    def _fix_subgraph_shapes(self, model: ir.Model, report: checks.StructureReport) -> checks.StructureReport:
        """The input fails strict shape inference: if dropping the shapes declared inside its subgraphs
        mends that, they were wrong; keep them dropped, say so, and check the passes in full."""
        dropped = checks.forget_subgraph_shapes(model)
        if not dropped:
            return report
        fixed = checks.check_structure(model)
        if fixed.shapes:
            checks.restore_shapes(dropped)
            return report
        innermost = report.shapes.splitlines()[0].split("Inference error(s): ")[-1]
        problem = (f"shapes declared inside its subgraphs contradict strict shape inference ({innermost}); "
                   f"the {len(dropped)} declared there are dropped and inferred again")
        logger.warning("the input model declares wrong shapes: %s", problem)
        self.input_problems.append(problem)
        return fixed

    def _fix_outputs(self, step: str, model: ir.Model) -> bool:
        conflicts = checks.output_shape_conflicts(model)
        for value, shape in conflicts:
            problem = (f"graph output {value.name!r} is declared {value.shape} but its producer gives "
                       f"{shape} (inferred after {step}); the wrong declaration is replaced")
            logger.warning("the input model declares a wrong output shape: %s", problem)
            self.input_problems.append(problem)
            value.shape = shape
        return bool(conflicts)


class DriftProbe(Instrument):
    """Compare ONNX Runtime outputs after each pass with those before it, on a fixed probe batch.

    Lossless passes must match within ``rtol``/``atol``; a pass with ``lossy = True`` must keep the
    cosine similarity of every output at ``min_cosine`` or above. The first pass that breaks this is
    named in the ``DriftFailure``.
    """

    def __init__(
        self,
        feeds: list[dict[str, np.ndarray]] | None = None,
        *,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        min_cosine: float = 0.98,
        dims: dict[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        self.feeds = feeds
        self.rtol, self.atol, self.min_cosine = rtol, atol, min_cosine
        self.dims, self.seed = dims, seed
        self.expected: list[list[np.ndarray]] = []
        self.checked: list[str] = []

    def _run(self, model: ir.Model) -> list[list[np.ndarray]]:
        sess = runtime.make_session(model)
        if self.feeds is None:
            specs = data.input_specs(model)
            self.feeds = [data.random_feed(specs, self.seed + i, self.dims) for i in range(2)]
        return [sess.run(None, feed) for feed in self.feeds]

    def begin(self, model: ir.Model) -> None:
        self.expected = self._run(model)

    def after_pass(self, pass_, model, result) -> None:
        got = self._run(model)
        names = [v.name for v in model.graph.outputs]
        for feed_i, (exp, out) in enumerate(zip(self.expected, got)):
            for name, e, g in zip(names, exp, out):
                problem = self._compare(pass_.lossy, e, g)
                if problem:
                    raise DriftFailure(
                        f"pass {pass_.name!r} changed output {name!r} on probe batch {feed_i}: "
                        f"{problem}"
                    )
        self.checked.append(pass_.name)
        self.expected = got

    def _compare(self, lossy: bool, e: np.ndarray, g: np.ndarray) -> str | None:
        if e.shape != g.shape:
            return f"shape {g.shape} != {e.shape}"
        if e.dtype.kind not in "fc":
            return None if np.array_equal(e, g) else "integer outputs differ"
        if not np.all(np.isfinite(g)[np.isfinite(e)]):
            return "NaN/Inf appeared"
        if lossy:
            a, b = e.astype(np.float64).ravel(), g.astype(np.float64).ravel()
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            cos = 1.0 if denom == 0 else float(a @ b / denom)
            return None if cos >= self.min_cosine else f"cosine {cos:.5f} < {self.min_cosine}"
        if np.allclose(g, e, rtol=self.rtol, atol=self.atol, equal_nan=True):
            return None
        err = float(np.max(np.abs(g.astype(np.float64) - e)))
        return f"max abs error {err:.3g} beyond rtol={self.rtol}, atol={self.atol}"


class DumpEach(Instrument):
    """Write the model after every pass that changed it, numbered, into a folder (for debugging)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.count = 0

    def begin(self, model: ir.Model) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def after_pass(self, pass_, model, result) -> None:
        self.count += 1
        model_io.save(model, self.folder / f"{self.count:03d}_{pass_.name}.onnx")
