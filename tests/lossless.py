"""Shared checks of lossless passes: run a pass on a model written in onnx text and verify what a
lossless rewrite promises (checker, strict shape inference, interface, ONNX Runtime outputs,
idempotence)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort

from onnxshrink import checks, model_io
from onnxshrink.data import input_specs, random_feed
from onnxshrink.pipeline import make_pass

HEAD = '<ir_version: 8, opset_import: ["" : 18]>\n'


def ort_outputs(proto: onnx.ModelProto | bytes, feed: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = proto if isinstance(proto, bytes) else proto.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feed)


def interface(model) -> list[tuple]:
    g = model.graph
    return [(v.name, v.dtype, v.shape) for v in [*g.inputs, *g.outputs]]


def run_pass(text, name: str, dims=None, feeds=None, **options):
    """Run a pass and check what a lossless rewrite promises; return (model, stats).

    Outputs are compared on ``feeds`` when given, else on two random feeds (symbolic dims from ``dims``).
    """
    proto = onnx.parser.parse_model(HEAD + text) if isinstance(text, str) else text
    onnx.checker.check_model(proto, full_check=True)
    model = model_io.load(proto)
    before = interface(model)
    result = make_pass(name, **options)(model)
    report = checks.check_structure(model)
    assert report, report.problems
    assert interface(model) == before
    after = model_io.to_bytes(model)
    specs = input_specs(model)
    for feed in feeds or [random_feed(specs, seed, dims or {}) for seed in range(2)]:
        for w, g in zip(ort_outputs(proto, feed), ort_outputs(after, feed)):
            assert w.dtype == g.dtype and w.shape == g.shape
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    again = make_pass(name, **options)(model)
    assert not again.modified, f"second run still changed: {dict(again.stats.counts)}"
    return model, result.stats


def ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def reasons(stats) -> str:
    return " | ".join(s.reason for s in stats.skipped)
