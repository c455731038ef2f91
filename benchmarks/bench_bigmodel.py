"""A synthetic model over 2 GB with external data, for the memory side of ``bench_lossless.py``.

12 dense layers alternating 4096x12288 and 12288x4096 float32 weights (2.4 GB in ``<name>.data``,
written in chunks so building it never holds a whole weight in memory), with foldable patterns between
them: biases computed by ``Add`` of two constants, a flatten shape from constant arithmetic, Identity
and Mul-by-one nodes, duplicated small initializers. Input ``x`` [N,4096] -> output ``y`` [N,4096].

    python benchmarks/bench_bigmodel.py OUT.onnx     # build only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H, LAYERS = 4096, 12288, 12
CHUNK_ROWS = 512


def _external(name: str, shape: tuple, f, rng: np.random.Generator, location: str) -> TensorProto:
    """Write a random float32 weight of ``shape`` to open file ``f`` and return its external TensorProto."""
    offset = f.tell()
    scale = np.float32(1.0 / np.sqrt(shape[0]))
    for start in range(0, shape[0], CHUNK_ROWS):
        rows = min(CHUNK_ROWS, shape[0] - start)
        f.write((rng.standard_normal((rows, shape[1]), dtype=np.float32) * scale).tobytes())
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(f.tell() - offset))):
        t.external_data.add(key=key, value=value)
    return t


def _layer_tail(i: int, x: str, width: int, nodes: list, inits: list, rng) -> str:
    """Bias from ``Add`` of two constants, Relu, a Mul by one and an Identity: all removable."""
    half = (0.05 * rng.standard_normal(width)).astype(np.float32)
    nodes.append(helper.make_node("Constant", [], [f"ba{i}"], value=numpy_helper.from_array(half)))
    inits.append(numpy_helper.from_array(half.copy(), f"bb{i}"))  # same values: dedup + fold
    nodes.append(helper.make_node("Add", [f"ba{i}", f"bb{i}"], [f"bias{i}"]))
    nodes.append(helper.make_node("Add", [x, f"bias{i}"], [f"a{i}"]))
    nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
    inits.append(numpy_helper.from_array(np.array(1.0, np.float32), f"one{i}"))
    nodes.append(helper.make_node("Mul", [f"r{i}", f"one{i}"], [f"m{i}"]))
    nodes.append(helper.make_node("Identity", [f"m{i}"], [f"h{i}"]))
    return f"h{i}"


def build_big(path: Path, seed: int = 0) -> Path:
    """Write the model to ``path`` (weights in ``path.name + '.data'`` beside it) and return ``path``."""
    path = Path(path)
    location = path.name + ".data"
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    with open(path.parent / location, "wb") as f:
        for i in range(LAYERS):
            shape = (D, H) if i % 2 == 0 else (H, D)
            inits.append(_external(f"w{i}", shape, f, rng, location))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]))
            x = _layer_tail(i, f"mm{i}", shape[1], nodes, inits, rng)
            if i % 2 == 1:  # flatten shape [-1, 64*64] from constant arithmetic
                nodes += [
                    helper.make_node("Constant", [], [f"c64_{i}"], value_ints=[64]),
                    helper.make_node("Mul", [f"c64_{i}", f"c64_{i}"], [f"d{i}"]),
                    helper.make_node("Constant", [], [f"neg{i}"], value_ints=[-1]),
                    helper.make_node("Concat", [f"neg{i}", f"d{i}"], [f"shape{i}"], axis=0),
                    helper.make_node("Reshape", [x, f"shape{i}"], [f"flat{i}"]),
                ]
                x = f"flat{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench")
    model.ir_version = 8
    onnx.save(model, path)
    return path


def big_feeds(seed: int = 0) -> list[dict]:
    return [{"x": np.random.default_rng(seed).standard_normal((2, D)).astype(np.float32)}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the .onnx to write (its weights go to OUT.onnx.data, 2.4 GB)")
    out = build_big(Path(ap.parse_args(argv).out))
    print(out, sum(p.stat().st_size for p in out.parent.glob(out.name + "*")) / 2**30, "GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
