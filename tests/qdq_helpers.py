"""Helpers shared by the QDQ tests: models from onnx text, calibrate + qdq pass, ORT runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper
from onnx_ir.passes.common import ShapeInferencePass
from onnxshrink.passes.qdq import QDQPass
from onnxshrink.passes.qdq_rules import PlanOptions, plan_qdq

from onnxshrink import checks, model_io, ort_int8
from onnxshrink.calibration import calibrate

RNG = np.random.default_rng(0)


def weights(*shape, scale: float = 0.3, seed: int | None = None) -> np.ndarray:
    rng = RNG if seed is None else np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def model(text: str, inits: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A model from onnx text graph ``text`` (``name (inputs) => (outputs) {...}``) plus initializers."""
    m = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n{text}')
    for name, arr in (inits or {}).items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(m)
    return m


def feeds_for(proto: onnx.ModelProto, n: int = 8, seed: int = 1, batch: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for inp in proto.graph.input:
            dims = [d.dim_value if d.dim_value else batch for d in inp.type.tensor_type.shape.dim]
            feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def prepare(proto) -> ir.Model:
    m = model_io.load(proto)
    ShapeInferencePass(check_type=False, strict_mode=False)(m)
    return m


def machine_options(**options) -> PlanOptions:
    """``PlanOptions`` as ``quantize`` sets them on this machine: 7-bit weights for the ops whose int8
    kernels saturate 8-bit ones here (``reduce_range="auto"``), unless a test names ``reduce_range_ops``."""
    options.setdefault("reduce_range_ops", tuple(sorted(ort_int8.saturating_ops(options.get("activations",
                                                                                            "uint8")))))
    return PlanOptions(**options)


def run_qdq(proto, feeds, *, table=None, **options):
    """Plan, calibrate (minmax) and run the qdq pass with ``machine_options``. Returns ``(ir_model,
    pass_result, table)``."""
    m = prepare(proto)
    plan = plan_qdq(m, machine_options(**options))
    if table is None:
        table = calibrate(m, feeds, plan.calibration_values(), cache_dir=False, progress=False)
    result = QDQPass(plan=plan, table=table)(m)
    report = checks.check_structure(m)
    assert report, report.problems
    return m, result, table


def ort_run(model_or_path, feed: dict, level=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if level is not None:
        so.graph_optimization_level = level
    if isinstance(model_or_path, ir.Model):
        model_or_path = model_io.to_bytes(model_or_path)
    elif isinstance(model_or_path, onnx.ModelProto):
        model_or_path = model_or_path.SerializeToString()
    else:
        model_or_path = str(model_or_path)
    sess = ort.InferenceSession(model_or_path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def nodes(m: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in m.graph.all_nodes() if n.op_type == op_type]


def const(v: ir.Value) -> np.ndarray:
    return v.const_value.numpy()


def dq_feeding(node: ir.Node, index: int) -> ir.Node | None:
    p = node.inputs[index].producer() if node.inputs[index] is not None else None
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def fragile_chain() -> onnx.ModelProto:
    """Three convs; the middle one's output channel 0 is 300x the others (and read 300x weaker next), so
    per-tensor int8 wipes out its other channels: that layer alone wrecks the output."""
    w2 = weights(8, 8, 3, 3, seed=2)
    w2[0] *= 300.0
    w3 = weights(4, 8, 3, 3, seed=3)
    w3[:, 0] /= 300.0
    return model("""g (float[1,4,8,8] inp) => (float[1,4,8,8] out) {
        a = Conv <pads=[1,1,1,1]> (inp, W1, B1)
        ra = Relu(a)
        b = Conv <pads=[1,1,1,1]> (ra, W2, B2)
        rb = Relu(b)
        out = Conv <pads=[1,1,1,1]> (rb, W3, B3)
    }""", {"W1": weights(8, 4, 3, 3, seed=1), "B1": weights(8), "W2": w2, "B2": weights(8),
           "W3": w3, "B3": weights(4)})
