"""``upcast_float16``: a float16 model computed in float32, its inputs and outputs kept float16.

Half-precision exports (``model.half()``, onnxconverter-common's ``convert_float_to_float16``) can run
slower on CPUs, which have few float16 kernels (the float32 digits MobileNet ran 1.95x faster than its
float16 twin; the other seven models about as fast), and int8 quantization has nothing to start from: QDQ, ONNX
Runtime's integer kernels and its quantization tool all want float32 (given float16 models, ORT's
``quantize_static`` and ``quantize_dynamic`` write models ONNX Runtime refuses to load, or fail:
``benchmarks/results/quantize_fp16.md``). This pass makes the computation float32 again;
``onnxshrink.quantize`` runs it on a model that computes in float16 before planning QDQ.

Rules (every graph: the main graph, If/Loop/Scan bodies and model-local functions):

1. Every float16 tensor value becomes float32: initializers (converted exactly: each float16 number
   is a float32 number), node outputs, subgraph inputs and outputs [values_upcast].
2. Attributes that make float16 tensors make float32 ones: ``Cast``'s ``to``, the ``dtype`` of
   ``EyeLike``/``Random*``/``Bernoulli``, and float16 tensor attributes (``Constant``'s ``value``,
   ``ConstantOfShape``'s ``value``) [attributes_upcast].
3. Main-graph inputs and outputs keep float16 (the model's interface does not change): a
   ``Cast(to=FLOAT)`` follows each float16 input and a ``Cast(to=FLOAT16)`` makes each float16 output,
   under its name [casts_added]. A value that is both an input and an output stays as it is.

Outputs differ from the float16 model's by float16 rounding (the float32 model is the more exact).
Refused, whole, with the reason: a model with float16 inside a sequence, optional or sparse type, or a
model that has no float16 tensor (nothing to do, silently).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxshrink.graph_utils import NameGen, is_default_domain
from onnxshrink.pass_infra import Changes, PassStats, ShrinkPass, iter_graphs

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
#: Default-domain ops whose ``dtype`` attribute names the element type they make.
_DTYPE_OPS = frozenset({"EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})


@dataclasses.dataclass(frozen=True)
class UpcastConfig:
    """No options: the interface always stays float16."""


class UpcastFloat16Pass(ShrinkPass):
    """See the module docstring."""

    name = "upcast_float16"
    Config = UpcastConfig
    changes = Changes.TOPOLOGY | Changes.WEIGHTS | Changes.DTYPES | Changes.NUMERICS
    lossy = True  # float16 rounding of intermediate values goes: outputs move by that rounding

    def apply(self, model: ir.Model, stats: PassStats) -> None:
        if not has_float16(model):
            return
        refusal = _refusal(model)
        if refusal:
            stats.notes["refused"] = refusal
            return
        graph = model.graph
        interface_in = [v for v in graph.inputs if v.dtype == F16]
        interface_out = [(i, v) for i, v in enumerate(graph.outputs) if v.dtype == F16 and not v.is_graph_input()]
        keep = set(interface_in)
        for g in iter_graphs(model):
            for v in _values(g):
                if v.dtype == F16 and v not in keep:
                    _upcast_value(v)
                    stats.add("values_upcast")
            for node in g:
                stats.add("attributes_upcast", _upcast_attributes(node))
        names = NameGen(model)
        for v in interface_in:
            if v.uses():
                _cast_input(graph, v, names)
                stats.add("casts_added")
        made: dict[int, ir.Value] = {}  # a value listed twice among the outputs gets one Cast
        for i, v in interface_out:
            if id(v) not in made:
                made[id(v)] = _cast_output(graph, v, names)
                stats.add("casts_added")
            graph.outputs[i] = made[id(v)]


def has_float16(model: ir.Model) -> bool:
    """Whether any tensor value of any graph of ``model`` is float16."""
    return any(v.dtype == F16 for g in iter_graphs(model) for v in _values(g))


def _values(g):
    inner = g.graph if isinstance(g, ir.Function) else g
    seen = [*inner.inputs, *inner.initializers.values(), *(v for node in inner for v in node.outputs)]
    return [v for v in seen if v is not None]


def _refusal(model: ir.Model) -> str | None:
    for g in iter_graphs(model):
        for v in _values(g):
            t = v.type
            if t is not None and not isinstance(t, ir.TensorType) and F16 == getattr(t, "dtype", None):
                return f"value {v.name!r} has type {t}: float16 inside a sequence, optional or sparse type"
    return None


def _upcast_value(v: ir.Value) -> None:
    v.type = ir.TensorType(F32)  # a fresh type object: types may be shared between values
    if v.const_value is not None:
        v.const_value = ir.tensor(v.const_value.numpy().astype(np.float32), name=v.const_value.name or v.name)


def _upcast_attributes(node: ir.Node) -> int:
    changed = 0
    for name, attr in list(node.attributes.items()):
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F16:
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32),
                                                                  name=attr.value.name))
            changed += 1
        elif (attr.type == ir.AttributeType.INT and attr.value == F16 and is_default_domain(node)
              and ((node.op_type == "Cast" and name == "to") or (node.op_type in _DTYPE_OPS and name == "dtype"))):
            node.attributes[name] = ir.AttrInt64(name, int(F32))
            changed += 1
    return changed


def _cast_input(graph: ir.Graph, v: ir.Value, names: NameGen) -> None:
    uses = list(v.uses())
    cast = ir.node("Cast", [v], {"to": int(F32)}, name=names(f"{v.name}_to_float32"))
    out = cast.outputs[0]
    out.name, out.type, out.shape = names(f"{v.name}_float32"), ir.TensorType(F32), v.shape
    for user, index in uses:
        user.replace_input_with(index, out)
    graph.insert_before(graph[0], cast) if len(graph) else graph.append(cast)


def _cast_output(graph: ir.Graph, v: ir.Value, names: NameGen) -> ir.Value:
    name, registered = v.name, v.is_initializer()
    if registered:  # initializers are keyed by name: out under the old one, back in under the new
        graph.initializers.pop(name)
    v.name = names(f"{name}_float32")
    if registered:
        graph.register_initializer(v)
    cast = ir.node("Cast", [v], {"to": int(F16)}, name=names(f"{name}_to_float16"))
    out = cast.outputs[0]
    out.name, out.type, out.shape = name, ir.TensorType(F16), v.shape
    graph.append(cast)
    return out
