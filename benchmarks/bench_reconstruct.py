"""Wall time of least-squares reconstruction: segments (each stage runs only the nodes no earlier stage
ran, ``onnxshrink.segments``) against one tap model per stage (every node up to the stage, what
reconstruction did before: ``segments.TapStages``), in the same run.

Cases: ``deep_resnet`` (``models.zoo_conv``; identity residual blocks, 16 channels, 8x8 maps) at 10,
25, 50 and 100 blocks on 4 random calibration feeds of batch 4, and the real PP-OCR cls, det and rec
(``rapidocr-onnxruntime`` wheel) and NudeNet (``nudenet`` wheel) on their bench_prune_real calibration
feeds. Each case prunes (0.5 on the 16-channel chains, where 0.3 rounds back to 16; 0.3 on the real
models; ``l1`` criterion, so planning reads no data) with ``--reconstruct``, once per strategy, the order
alternating by case; ``s`` is the whole ``prune()`` call. ``same``: largest difference of the two
pruned models' outputs on one feed, relative to the largest output (the strategies compute the same
thing, up to float rounding that the least-squares refits pass on).

    python benchmarks/bench_reconstruct.py [--blocks 10,25,50,100] [--real ppocr_cls,ppocr_det,...]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxshrink import data, model_io, pruning, runtime, segments


@contextlib.contextmanager
def tap_models():
    """Reconstruction with one tap model per stage (the strategy before segments)."""
    real = segments.reader
    segments.reader = lambda model, providers=None: segments.TapStages(model, providers)
    try:
        yield
    finally:
        segments.reader = real


def case_inputs(name: str):
    if name.startswith("deep_resnet_"):
        from models.zoo_conv import deep_resnet

        proto = deep_resnet(int(name.rsplit("_", 1)[1]))
        specs = data.input_specs(model_io.load(proto))
        feeds = [data.random_feed(specs, seed, {"N": 4}) for seed in range(4)]
        return proto, feeds, {}, 0.5  # 16 channels: 0.3 rounds back up to 16
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_prune_real

    from models import fetch_real

    spec = bench_prune_real.MODELS[name]
    return str(fetch_real.fetch(name)), fetch_real.example_feeds(name, n=spec.calib, seed=0), spec.dims, 0.3


def run_case(name: str, flip: bool) -> dict:
    model, feeds, dims, ratio = case_inputs(name)
    order = ["tap", "segments"] if flip else ["segments", "tap"]
    row: dict = {"case": name, "ratio": ratio}
    outs = {}
    for strategy in order:
        ctx = tap_models() if strategy == "tap" else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            res = pruning.prune(model, ratio, calibration=feeds, reconstruct=True, dims=dims or None)
            row[f"{strategy}_s"] = round(time.perf_counter() - t0, 2)
        row["stages"] = res.reconstruction["passes"]
        row["nodes"] = len(list(res.model.graph))
        outs[strategy] = runtime.make_session(res.model, threads=1).run(None, feeds[0])
    row["same"] = float(max(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30)
                            for a, b in zip(outs["tap"], outs["segments"])))
    row["speedup"] = round(row["tap_s"] / row["segments_s"], 2)
    print(row, flush=True)
    return row


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruct_scale.json").write_text(json.dumps(rows, indent=1))
    load = os.getloadavg()[0]
    lines = [
        "# Reconstruction time: segments against one tap model per stage",
        "",
        ("`python benchmarks/bench_reconstruct.py` (see its docstring): `prune(ratio, l1, reconstruct)`, "
         "once with each strategy in the same run. `stages`: refit passes over the calibration data; "
         "`nodes`: of the pruned model; `same`: largest output difference between the two results, relative to "
         "the largest output."),
        "",
        f"1-minute load average at the end: {load:.2f} (2 shared cores).",
        "",
        "| case | ratio | nodes | stages | tap models s | segments s | speed-up | same |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ratio']} | {r['nodes']} | {r['stages']} | {r['tap_s']} | {r['segments_s']} | "
                     f"{r['speedup']:.2f}x | {r['same']:.1e} |")
    (out / "reconstruct_scale.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="10,25,50,100")
    ap.add_argument("--real", default="ppocr_cls,ppocr_det,ppocr_rec,nudenet_320n")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    cases = [f"deep_resnet_{b}" for b in args.blocks.split(",") if b] + [r for r in args.real.split(",") if r]
    rows = [run_case(name, flip=bool(i % 2)) for i, name in enumerate(cases)]
    write(rows, Path(args.out))
    print((Path(args.out) / "reconstruct_scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
