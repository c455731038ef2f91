"""CUDA / TensorRT paths of validate, bench, explain and check.

Self-contained (models built here, no fixtures), so it runs as is where onnxruntime-gpu replaces
onnxruntime: ``pytest tests/test_cuda.py``. Without a CUDA provider every test skips with the reason.
No timed assertions: latency budgets are set so they hold whatever the timing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import bench, explain, validate
from onnxshrink.cli import main
from onnxshrink.runtime import available_providers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(),
                       reason="no CUDAExecutionProvider in this onnxruntime (install onnxruntime-gpu on a GPU machine)"),
]
needs_trt = pytest.mark.skipif("TensorrtExecutionProvider" not in available_providers(),
                               reason="no TensorrtExecutionProvider in this onnxruntime")


def conv_net(scale: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-GAP-Flatten-Gemm on [N, 3, 32, 32]; ``scale`` multiplies the last Gemm weight."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, s=1.0):
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.standard_normal(shape) * s * np.sqrt(2 / fan_in)).astype(np.float32), name)

    inits = [w("w1", 16, 3, 3, 3), w("w2", 32, 16, 3, 3), w("fc", 10, 32, s=scale),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def paths(tmp_path):
    ref, same, damaged = tmp_path / "ref.onnx", tmp_path / "same.onnx", tmp_path / "damaged.onnx"
    onnx.save(conv_net(), ref)
    onnx.save(conv_net(), same)
    onnx.save(conv_net(scale=3.0), damaged)
    return str(ref), str(same), str(damaged)


def test_validate_cuda_candidate_against_cpu_reference(paths):
    ref, same, _ = paths
    rep = validate.compare(ref, same, None, providers="cuda", reference_providers="cpu", count=3, dims={"N": 4})
    assert rep and rep.providers == ["CUDAExecutionProvider"]
    assert rep.outputs["logits"].cosine > 0.9999  # same weights, different kernels (TF32 may be in play)
    assert rep.outputs["logits"].top1_agreement == 1.0


def test_bench_cuda_uses_io_binding_and_reports_memory(paths):
    ref, same, _ = paths
    report = bench.measure([ref, same], None, providers="cpu,cuda", runs=20, warmup=5, dims={"N": 8})
    cuda = report.providers["cuda"]
    assert not cuda.skipped and cuda.io_binding
    assert [m.latency.runs for m in cuda.models] == [20, 20]
    assert all(m.latency.min_ms > 0 for m in cuda.models)
    assert cuda.ratio and cuda.ratio.ci_low <= cuda.ratio.speedup <= cuda.ratio.ci_high
    assert all(m.memory_kind for m in cuda.models)
    assert not report.providers["cpu"].io_binding
    json.dumps(report.to_dict())


def test_explain_on_cuda_ranks_the_damaged_layer(paths):
    ref, _, damaged = paths
    nodes = explain.rank_nodes(ref, damaged, None, providers="cuda", batches=2, dims={"N": 4})
    assert nodes[0].node == "fc"


def test_check_on_cuda_exit_codes(paths, tmp_path):
    ref, same, damaged = paths
    junit = tmp_path / "gate.xml"
    common = ["--providers", "cuda", "--shape", "N=4", "--count", "2", "--runs", "10", "--warmup", "2",
              "--set", "max_latency_ms.cuda=1e9", "--min-sqnr-db", "30", "--junit", str(junit)]
    assert main(["check", ref, same, *common]) == 0
    assert "max_latency_ms.cuda" in junit.read_text()
    assert main(["check", ref, damaged, *common]) == 1


@needs_trt
def test_bench_tensorrt(paths):
    ref, same, _ = paths
    report = bench.measure([ref, same], None, providers="tensorrt", runs=10, warmup=3, dims={"N": 4})
    trt = report.providers["tensorrt"]
    assert trt.skipped or (trt.io_binding and trt.ratio is not None)
