"""Which int8 layers ONNX Runtime computes inexactly with 8-bit weights on this machine, asked of it.

On x86 CPUs with AVX2 but without VNNI, MLAS multiplies u8 activations by s8 weights with VPMADDUBSW,
which adds two u8 x s8 products into a saturating int16: 255 * 127 * 2 = 64770 overflows it, so a layer
whose weights use all 8 bits computes a clipped sum. ONNX Runtime means to re-encode such weights as u8
at session load (its ``Avx2WeightS8ToU8Transformer``), but on the AVX2 EPYC this was measured on,
ONNX Runtime 1.32 still clipped Conv, Gemm, MatMul and MatMulInteger, and not ConvTranspose (the probe's
answer heads ``benchmarks/results/qdq_reduce_range.md``). Weights of 7 bits (``|q| <= 64``) keep
every pair within int16 (255 * 64 * 2 = 32640) at the price of one bit
(``benchmarks/results/qdq_reduce_range.md``: digits inception 100% -> 90% accuracy with 8-bit weights
on that CPU, 100% with 7-bit ones). VNNI (VPDPBUSD) accumulates in int32 and never saturates.

``saturating_ops(activations, providers)`` asks ONNX Runtime instead of reading CPU flags: one probe
model holds a QDQ Conv, ConvTranspose, MatMul and Gemm and a dynamic MatMulInteger, each fed the largest
activation and weight codes, and the op types whose output differs from the exact integer sum are the
ones whose weights ``quantize`` narrows to 7 bits by default (``reduce_range="auto"``). The answer holds
for this machine: a model quantized on a VNNI CPU and deployed on an AVX2 one should be quantized with
``reduce_range=True`` (``--reduce-range all``).
"""

from __future__ import annotations

import functools
import logging
import platform

import numpy as np

from onnxshrink import ort_blocks

logger = logging.getLogger(__name__)

#: The op types the probe checks: the static QDQ compute ops with weights, and the dynamic pass's
#: ``MatMulInteger`` (its key for MatMul/Gemm layers quantized dynamically).
PROBED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulInteger")

#: Flags of instructions that accumulate u8 x s8 products in int32 (no saturation).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

_K = 16  # input channels: with a 3x3 kernel, 72 saturating pairs per output
_OUT_SHAPES = ([1, 16, 6, 6], [1, 16, 8, 8], [1, 16], [1, 16], [1, 16])  # of PROBED, in order
_CODE = 100  # the exact output's quantized code, within int8 and uint8 (a clipped sum lands far below it)


@functools.cache
def saturating_ops(activations: str = "uint8", providers: tuple[str, ...] = ("CPUExecutionProvider",)
                   ) -> frozenset[str]:
    """The op types (of ``PROBED``) whose int8 kernels lose precision with 8-bit weights on this machine
    with ``activations`` (``uint8``/``int8``) on ``providers``. If the probe cannot run: every probed op
    on x86 CPUs with AVX2 and without VNNI (``/proc/cpuinfo``), else none."""
    try:
        got = _run_probe(activations, list(providers))
    except Exception as e:  # noqa: BLE001 - any failure of the probe falls back to the CPU flags
        guess = frozenset(PROBED) if _cpuinfo_saturates() else frozenset()
        logger.warning("int8 saturation probe failed (%s); assuming %s", e,
                       "saturating u8s8 kernels (AVX2 without VNNI)" if guess else "exact int8 kernels")
        return guess
    bad = frozenset(op for op, (y, exact) in zip(PROBED, got) if not np.allclose(y, exact, rtol=0.02))
    logger.debug("int8 saturation probe (%s activations, %s): %s", activations, providers, sorted(bad) or "none")
    return bad


def _run_probe(activations: str, providers: list[str]) -> list[tuple[np.ndarray, float]]:
    from onnxshrink import runtime

    model, feeds, exact = probe_model(activations)
    outs = runtime.make_session(model.SerializeToString(), providers).run(None, feeds)
    return list(zip(outs, exact))


def _qmax(activations: str) -> int:
    return 255 if activations == "uint8" else 127


def _exact(activations: str, terms: int) -> float:
    return float(terms * _qmax(activations) * 127)


def probe_model(activations: str):
    """``(model, feeds, exact)``: one output per ``PROBED`` op, written as the QDQ pass writes it (Q/DQ on
    the input, int8 weights all 127, Q/DQ on the output, so ONNX Runtime fuses it into its integer kernel:
    QLinearConv, its NHWC variant, QGemm, QLinearMatMul), fed the largest activation code; ``exact`` is
    each output's exact value, which the output's scale represents as code ``_CODE``."""
    from onnx import TensorProto, helper, numpy_helper

    qtype = np.uint8 if activations == "uint8" else np.int8
    k = _K
    cases = [("Conv", "x4", np.full((16, k, 3, 3), 127, np.int8), {}, 9 * k),
             ("ConvTranspose", "x4", np.full((k, 16, 1, 1), 127, np.int8), {}, k),
             ("MatMul", "x2", np.full((k, 16), 127, np.int8), {}, k),
             ("Gemm", "x2", np.full((16, k), 127, np.int8), {"transB": 1}, k)]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, qtype), "z"), numpy_helper.from_array(np.array(0, np.int8), "wz")]
    nodes, outputs, exact = [], [], []
    for op, x, w, attrs, terms in cases:
        exact.append(_exact(activations, terms))
        inits += [numpy_helper.from_array(w, f"{op}_wq"),
                  numpy_helper.from_array(np.array(exact[-1] / _CODE, np.float32), f"{op}_ys")]
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"{op}_xq"]),
                  helper.make_node("DequantizeLinear", [f"{op}_xq", "s", "z"], [f"{op}_x"]),
                  helper.make_node("DequantizeLinear", [f"{op}_wq", "s", "wz"], [f"{op}_w"]),
                  helper.make_node(op, [f"{op}_x", f"{op}_w"], [f"{op}_y"], **attrs),
                  helper.make_node("QuantizeLinear", [f"{op}_y", f"{op}_ys", "z"], [f"{op}_yq"]),
                  helper.make_node("DequantizeLinear", [f"{op}_yq", f"{op}_ys", "z"], [op])]
        outputs.append(op)
    nodes += [helper.make_node("DynamicQuantizeLinear", ["xd"], ["dq", "ds", "dz"]),
              helper.make_node("MatMulInteger", ["dq", "MatMul_wq", "dz", "wz"], ["mmi"]),
              helper.make_node("Cast", ["mmi"], ["MatMulInteger"], to=TensorProto.FLOAT)]
    outputs.append("MatMulInteger")
    exact.append(_exact("uint8", k))  # DynamicQuantizeLinear is uint8 whatever the static activations
    shapes = {"x2": [1, k], "x4": [1, k, 8, 8], "xd": [1, k]}
    graph = helper.make_graph(
        nodes, "int8_saturation_probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in shapes.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, d) for o, d in zip(outputs, _OUT_SHAPES)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what onnx writes by default may be newer than an older onnxruntime reads
    q = float(_qmax(activations))
    feeds = {n: np.full(d, 255.0 if n == "xd" else q, np.float32) for n, d in shapes.items()}
    return model, feeds, exact


#: Ops holding an int8 weight: op -> (the ``PROBED`` op whose kernel computes it, weight input index); the
#: activation is input 0. QDQ ops read both through DequantizeLinear; QOperator ops hold them directly.
_WEIGHTED = {
    "Conv": ("Conv", 1), "ConvTranspose": ("ConvTranspose", 1), "MatMul": ("MatMul", 1), "Gemm": ("Gemm", 1),
    "QLinearConv": ("Conv", 3), "QLinearMatMul": ("MatMul", 3), "MatMulInteger": ("MatMulInteger", 1),
}


def clipped_layers(model, providers=None) -> list[str]:
    """Layers of int8 ``model`` (an ``ir.Model``; QDQ or QOperator form, any graph) whose weights can clip
    (two neighbours past 128, ``_may_clip``) in an op whose int8 kernel saturates them on this machine, as
    ``"Conv 'name'"``: what explains drift that shows only on some CPUs (requantize with pair-safe or
    7-bit weights)."""
    from onnxshrink import runtime

    provs = tuple(runtime.resolve_providers(providers))
    out = []
    for graph in model.graphs():
        for node in graph:
            probed, w_index = _WEIGHTED.get(node.op_type, (None, 0))
            if probed is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= w_index:
                continue
            activations = _activation_type(node, 0)
            if activations is None or probed not in saturating_ops(activations, provs):
                continue  # the weight is read only where this machine's kernel saturates
            weight = _int8_weight(node, w_index)
            if weight is not None and weight.dtype == np.int8 and _may_clip(weight, probed, node):
                out.append(f"{node.op_type} {node.name!r}")
    return out


def _may_clip(weight: np.ndarray, probed: str, node) -> bool:
    """Whether int8 ``weight`` has two neighbours (in the K order the kernel pairs, ``kernel_rows``)
    summing past 128 in magnitude; where that order is not known, whether any code is beyond +-64."""
    from onnxshrink.graph_utils import int_attr
    from onnxshrink.passes._qdq_math import PAIR_LIMIT, kernel_rows, neighbour_sums

    trans_b = node.op_type == "Gemm" and int_attr(node, "transB", 0) == 1
    rows = kernel_rows(weight.astype(np.float32), "MatMul" if probed == "MatMulInteger" else probed, None, trans_b)
    if rows is None:
        return int(np.abs(weight.astype(np.int16)).max()) > 64
    return rows.shape[1] > 1 and float(neighbour_sums(rows, 1).max()) > PAIR_LIMIT


def clipped_note(layers: list[str]) -> str | None:
    """One line for users about ``clipped_layers``' answer (None when there are none)."""
    if not layers:
        return None
    more = f" and {len(layers) - 3} more" if len(layers) > 3 else ""
    return (f"note: {len(layers)} int8 layers hold 8-bit weights that ONNX Runtime's int8 kernels on this CPU "
            f"saturate (as on x86 CPUs with AVX2 and no VNNI): {', '.join(layers[:3])}{more}; their sums are "
            "clipped here, not on CPUs whose kernels are exact. For such CPUs quantize with narrowed weights (onnxshrink optimize --quantize int8 "
            "does where it runs; --reduce-range all for a model built elsewhere)")


def _integer_value(node, index: int):
    """The integer value behind input ``index``: the input itself (QOperator ops) or the input of the
    DequantizeLinear feeding it (QDQ ops; None without one)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None and node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        producer = value.producer()
        value = producer.inputs[0] if producer is not None and producer.op_type == "DequantizeLinear" else None
    return value


def _int8_weight(node, index: int):
    from onnxshrink.graph_utils import const_array

    value = _integer_value(node, index)
    return None if value is None else const_array(value)


def _activation_type(node, index: int) -> str | None:
    """``uint8``/``int8`` of the integer activation behind input ``index``, from its declared type or its
    producer (DynamicQuantizeLinear: uint8; QuantizeLinear: its zero point's type)."""
    from onnxshrink.graph_utils import const_array

    value = _integer_value(node, index)
    if value is None:
        return None
    dtype = value.dtype.numpy() if value.dtype is not None else None
    producer = value.producer()
    if dtype is None and producer is not None and producer.op_type == "DynamicQuantizeLinear":
        dtype = np.dtype(np.uint8)
    elif dtype is None and producer is not None and producer.op_type == "QuantizeLinear":
        zp = const_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
        dtype = np.dtype(np.uint8) if zp is None else zp.dtype  # no zero point: uint8 (the ONNX default)
    return {np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}.get(None if dtype is None else np.dtype(dtype))


def describe_cpu(activations: str = "uint8") -> dict:
    """What decides int8 speed and exactness here, for benchmark headers: ISA flags and the probe's answer."""
    flags = ort_blocks.cpu_flags()
    return {"machine": platform.machine(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool(flags & VNNI_FLAGS), "saturating_ops": sorted(saturating_ops(activations))}


def _cpuinfo_saturates() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = ort_blocks.cpu_flags()
    return "avx2" in flags and not flags & VNNI_FLAGS
