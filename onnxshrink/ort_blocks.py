"""The channel block of ONNX Runtime's CPU convolution kernels on this machine, asked of ONNX Runtime.

ONNX Runtime's NCHWc layout transformer (graph optimization level ``all``) runs a Conv on its blocked
kernels only when the input channels are a multiple of the block (or fewer than one block) and pads the
output channels up to a whole block; depthwise convs and pools need whole blocks too. Other widths fall
back to im2col + SGEMM, 1.5-2x slower per MAC (``benchmarks/results/prune_kernels.md``), or pay for the
padding. The block is 16 with AVX-512, 8 with AVX2, and there is no NCHWc layout on other CPUs.

``nchwc_block_size()`` asks ONNX Runtime itself: it optimizes a one-Conv model with one output channel
and reads the output channels of the weight the transformer padded (the block), or 1 when the Conv stays
plain. ``default_round_to()`` is the width rounding pruning uses by default: that block, at least 8
(SGEMM and vector units still like multiples of 8 where there is no NCHWc layout).
"""

from __future__ import annotations

import functools
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: The rounding used where neither ONNX Runtime nor /proc/cpuinfo can tell.
FALLBACK = 8


@functools.cache
def nchwc_block_size() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU (16, 8), 1 if it does not use the layout, or 0
    if it could not be determined (no onnxruntime, or the probe failed)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from onnxshrink import runtime

        level = runtime.ort().GraphOptimizationLevel.ORT_ENABLE_ALL
    except ImportError:
        return 0
    weight = numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnx writes by default may be newer than an older onnxruntime reads
    try:
        with tempfile.TemporaryDirectory(prefix="onnxshrink-nchwc-") as tmp:
            path = Path(tmp) / "probe.onnx"  # ORT's warning that it is hardware-specific is silenced
            runtime.make_session(model.SerializeToString(), ["CPUExecutionProvider"],
                                 options=runtime.session_options(optimized_path=path, level=level))
            optimized = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means "unknown"
        logger.debug("nchwc probe failed: %s", e)
        return 0
    return _padded_output_channels(optimized)


def _padded_output_channels(model) -> int:
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in dims:
            return int(dims[node.input[1]][0]) if "nchwc" in node.domain else 1
    return 0


def default_round_to() -> int:
    """Kept widths are rounded to this many channels by default: ONNX Runtime's NCHWc block on this CPU
    (16 with AVX-512, 8 with AVX2), at least 8; where ONNX Runtime cannot tell, 16 on x86 CPUs with
    AVX-512 (``/proc/cpuinfo``), else 8."""
    block = nchwc_block_size()
    if block > 1:
        return max(block, FALLBACK)
    if block == 1:
        return FALLBACK
    return _cpuinfo_guess()


def _cpuinfo_guess() -> int:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return FALLBACK
    return 16 if "avx512f" in cpu_flags() else FALLBACK


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line's value in ``/proc/cpuinfo`` (None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((ln.partition(":")[2].strip() for ln in text.splitlines() if ln.split(":")[0].strip() == name),
                None)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()
