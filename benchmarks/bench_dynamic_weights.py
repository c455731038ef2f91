"""Dynamic int8 weights on this CPU: 8-bit, 7-bit or pair-safe scales.

ONNX Runtime multiplies ``MatMulInteger`` and ``com.microsoft.DynamicQuantizeLSTM`` weights (int8) with
a u8 x s8 GEMM that CPUs without VNNI saturate: it adds two neighbouring products into an int16. For
each model, the ``dynamic_quantize`` pass (onnxshrink's dynamic mode, every MatMul/Gemm/LSTM) with the
weights scaled three ways: ``8-bit`` (absmax to 127), ``7-bit`` (absmax to 64, the rule before) and
``pair-safe`` (``_qdq_math.pair_safe_scale``: no two neighbours along the input axis sum past 128, so
nothing clips), and ``default``, what ``quantize(mode="dynamic")`` does here (pair-safe where the probe
reports the GEMM saturating, else 8-bit). Columns: ``drift``, 1 - cosine of the output flattened over
the held-out feeds (as ``onnxshrink validate``; 32 feeds, 8 for ddddocr); ``speedup``, float latency /
quantized latency (ONNX Runtime CPU, 1 thread, the two timed interleaved, medians).

Models: openWakeWord's ``hey_mycroft`` (two tf2onnx LSTMs and a Gemm), ddddocr's recognizer (a CNN and
a bidirectional LSTM of 512), the digits ViT and MLP, the zoo transformer block.

    python benchmarks/bench_dynamic_weights.py [--models oww_hey_mycroft,digits:vit] [--runs 200] [--out DIR]

Writes ``dynamic_weights_<isa>.md`` and ``.json`` to ``--out`` (default ``benchmarks/results``), where
``<isa>`` is ``avx512`` or ``avx2`` (and ``vnni`` when the CPU has it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink.passes.dynamic_quant import DynamicQuantPass

from benchmarks.bench_quantize_vs_ort import model_and_feeds
from onnxshrink import bench, model_io, ort_int8, validate

MODELS = ("oww_hey_mycroft", "ddddocr_ocr", "digits:vit", "digits:mlp", "zoo:transformer")
RUNS = {"ddddocr_ocr": 40}
FEEDS = {"ddddocr_ocr": 8}  # held-out feeds of the real models (default 32)


def variants() -> dict[str, dict]:
    narrow = "MatMulInteger" in ort_int8.saturating_ops()
    return {"8-bit": {}, "7-bit": {"reduce_range": True, "narrow": "7bit"},
            "pair-safe": {"reduce_range": True, "narrow": "pair_safe"}, "default": {"reduce_range": narrow}}


def feeds(name: str, tmp: Path) -> tuple[str, list[dict]]:
    """The float model's path and held-out feeds (``bench_quantize_vs_ort.model_and_feeds``)."""
    spec = name if ":" in name else f"real:{name}"
    src, _, evals, _ = model_and_feeds(spec, tmp, n_calib=0, n_evals=FEEDS.get(name, 32))
    return str(src), evals


def run_model(name: str, runs: int, tmp: Path) -> dict:
    src, evals = feeds(name, tmp)
    row: dict = {"load": [round(os.getloadavg()[0], 2)]}
    for label, cfg in variants().items():
        m = model_io.load(src)
        counts = DynamicQuantPass(**cfg)(m).stats.counts
        out = tmp / f"{name.replace(':', '_')}_{label}.onnx"
        model_io.save(m, out)
        drift = 1 - validate.compare(src, out, evals, threads=1).overall["cosine"]
        ratio = bench.measure([src, str(out)], [evals[0]], runs=RUNS.get(name, runs), warmup=10).providers["cpu"].ratio
        row[label] = {"drift": float(f"{drift:.3g}"), "speedup": round(ratio.speedup, 3),
                      "layers": {k: v for k, v in counts.items() if k.endswith("_dynamic")}}
        print(f"{name:16s} {label:8s} drift {drift:.3g}  speedup {ratio.speedup:.3f}", flush=True)
    row["load"].append(round(os.getloadavg()[0], 2))
    return row


def to_markdown(results: dict, cpu: dict) -> str:
    labels = list(variants())
    lines = ["# Dynamic int8 weights: 8-bit, 7-bit or pair-safe scales", "",
             (f"`python benchmarks/bench_dynamic_weights.py` ({time.strftime('%Y-%m-%d')}), see its docstring. "
              f"CPU: {cpu['name']}, AVX2 {cpu['avx2']}, AVX-512 {cpu['avx512f']}, VNNI {cpu['vnni']}; int8 kernels "
              f"that clip 8-bit weights here: {', '.join(cpu['saturating_ops']) or 'none'}. ONNX Runtime CPU, "
              "1 thread."), "",
             "| model | layers | " + " | ".join(f"{v} drift | {v} speedup" for v in labels) + " | load |",
             "|---|---|" + "---|---|" * len(labels) + "---|"]
    for name, row in results.items():
        layers = ", ".join(f"{k.split('_')[0]} {v}" for k, v in row[labels[0]]["layers"].items())
        cells = " | ".join(f"{row[v]['drift']:.3g} | {row[v]['speedup']:.2f}x" for v in labels)
        lines.append(f"| {name} | {layers} | {cells} | {row['load'][0]}-{row['load'][1]} |")
    if cpu["saturating_ops"]:
        lines += ["", ("`default` is the `pair-safe` model on this CPU (the probe reports the GEMM saturating): "
                       "the two speed-ups of one model show the timing noise (the digits MLP runs in about 10 us).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from onnxshrink import ort_blocks

    cpu = {**ort_int8.describe_cpu(), "name": ort_blocks.cpu_name()}
    isa = ("avx512" if cpu["avx512f"] else "avx2") + ("_vnni" if cpu["vnni"] else "")
    with tempfile.TemporaryDirectory(prefix="bench-dynw-") as tmp:
        results = {name: run_model(name, args.runs, Path(tmp)) for name in args.models.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dynamic_weights_{isa}.json").write_text(json.dumps({"cpu": cpu, "models": results}, indent=1) + "\n")
    path = out / f"dynamic_weights_{isa}.md"
    path.write_text(to_markdown(results, cpu))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
