"""onnxshrink structured pruning on the trained digits classifiers, beside Torch-Pruning's magnitude pruner.

For each model (resnet, mobilenet, inception, cnn, mlp, vit) and ratio (0.3, 0.5), without any training:

- onnxshrink, data-free: ``l1`` criterion, no reconstruction;
- onnxshrink ``l1`` + least-squares reconstruction (``--reconstruct``) and ``l1`` + BN re-estimation;
- onnxshrink ``reconstruction`` criterion (greedy least-squares saliency) + least-squares reconstruction;
- Torch-Pruning 1.6 ``MagnitudePruner`` (L1 group magnitude, the same ratio, classifier ignored,
  ``round_to=8``) on the same trained torch module, evaluated in torch.

Calibration: the 512-sample ``calib`` split (unlabeled); accuracy: the 360-sample ``test`` split.
Params and MACs: onnxshrink's counters on the ONNX models (Torch-Pruning's own counter for its models).
Accuracy variants use widths rounded to 8 (25-30% of each group at ratio 0.3); the best variant is also
run with the default rounding (16 with AVX-512). Latency: ONNX Runtime CPU, 1 thread, the unpruned and
the pruned model interleaved (``onnxshrink.bench``), batch 1 and batch 32; ``speedup`` = median(unpruned)
/ median(pruned), for widths rounded to the default, to 8 and not rounded. Widths depend only on the
ratio and the rounding, not on the criterion, so one latency row serves every variant. Torch-Pruning's
model is exported with ``torch.onnx.export`` and timed the same way.

    /work/venv/bin/python benchmarks/bench_prune.py [--models resnet,mlp] [--ratios 0.3,0.5]
        [--runs 200] [--out benchmarks/results]

Dev only: needs torch and torch-pruning (``pip install torch==2.13.0 torch-pruning``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import digits
from onnxshrink import bench, pruning, runtime

MODELS = ("resnet", "mobilenet", "inception", "cnn", "mlp", "vit")
VARIANTS = {  # label -> prune() options
    "l1": {"criterion": "l1"},
    "l1+bn": {"criterion": "l1", "reconstruct": "bn"},
    "l1+lsq": {"criterion": "l1", "reconstruct": "lsq"},
    "recon+lsq": {"criterion": "reconstruction", "reconstruct": "lsq"},
}


def accuracy(model, name: str) -> float:
    x, y = digits.model_input(name, "test")
    session = runtime.make_session(model, threads=1)
    return digits.accuracy(session.run(None, {"input": x})[0], y)


def latency(ref, cand, name: str, batch: int, runs: int) -> float:
    x, _ = digits.model_input(name, "test")
    report = bench.measure([ref, cand], [{"input": x[:batch]}], threads=1, warmup=10, runs=runs,
                           labels=["unpruned", "pruned"])
    return report.providers["cpu"].ratio.speedup


def ours(name: str, ratio: float, calib, runs: int) -> dict:
    """Accuracy of every variant with widths rounded to 8 (25-30% of each group's channels), accuracy of
    the best variant with the default rounding, and latency for each rounding."""
    path = str(digits.trained_path(name))
    row: dict = {"acc": {}, "seconds": {}, "rounding": {}}
    for label, opts in VARIANTS.items():
        t0 = time.perf_counter()
        result = pruning.prune(path, ratio, round_to=8, calibration=calib, **opts)
        row["seconds"][label] = round(time.perf_counter() - t0, 1)
        row["acc"][label] = accuracy(result.model, name)
        print(f"  {name} {ratio} {label}: acc {row['acc'][label]:.4f} ({row['seconds'][label]} s)", flush=True)
    default = pruning.prune(path, ratio, calibration=calib, **VARIANTS["recon+lsq"])
    row["acc_default_rounding"] = accuracy(default.model, name)
    row["blocked"] = sorted({s for g in default.plan.groups if g.status == "blocked" for s in g.stops[:1]})
    for label, opts in (("default", {}), ("8", {"round_to": 8}), ("1", {"round_to": 1, "min_width": 1})):
        with tempfile.TemporaryDirectory() as tmp:
            cand = str(Path(tmp) / "pruned.onnx")
            result = pruning.prune(path, ratio, cand, **opts)
            row["rounding"][label] = {
                "round_to": result.plan.settings["round_to"],
                "params": [result.before["parameters"], result.after["parameters"]],
                "macs": [result.before["macs"], result.after["macs"]],
                "speedup": {b: latency(path, cand, name, b, runs if b == 1 else max(runs // 4, 30))
                            for b in (1, 32)},
            }
        r = row["rounding"][label]
        print(f"  {name} {ratio} round {r['round_to']}: -MACs {pct(r['macs'])} speedup {r['speedup']}", flush=True)
    return row


def _tp_attention_forward(self, x):
    """digits_torch.Attention.forward with the merge reshape to heads * head_dim (not the input width),
    which Torch-Pruning needs to prune heads; numerically the same for the unpruned module."""
    import torch

    b, n, _ = x.shape

    def split(t):
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    att = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
    return self.proj((att @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def torch_pruning(name: str, ratio: float, runs: int) -> dict:
    import torch
    import torch_pruning as tp

    from models import digits_torch

    torch.set_num_threads(1)
    digits_torch.Attention.forward = _tp_attention_forward
    model = digits_torch.load_torch(name)
    x, y = digits.model_input(name, "test")
    example = torch.from_numpy(x[:2])
    macs0, params0 = tp.utils.count_ops_and_params(model, example)
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
    kw: dict = {}
    if name == "vit":
        heads = {lin: m.heads for m in model.modules() if isinstance(m, digits_torch.Attention)
                 for lin in (m.q, m.k, m.v)}
        kw = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": ratio}
    row: dict = {}
    try:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=ignored, round_to=8, **kw)
        pruner.step()
        for m in model.modules():
            if isinstance(m, digits_torch.Attention):
                m.heads = pruner.num_heads[m.q]
                m.head_dim = m.q.out_features // m.heads
        with torch.no_grad():
            row["acc"] = digits.accuracy(model(torch.from_numpy(x)).numpy(), y)
        macs, params = tp.utils.count_ops_and_params(model, example)
        row.update(params=[int(params0), int(params)], macs=[int(macs0), int(macs)])
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "tp.onnx")
            torch.onnx.export(model, example, out, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}}, opset_version=17, dynamo=False)
            ref = str(digits.trained_path(name))
            row["speedup"] = {b: latency(ref, out, name, b, runs if b == 1 else max(runs // 4, 30)) for b in (1, 32)}
    except Exception as e:  # noqa: BLE001 - report what Torch-Pruning could not do
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(f"  {name} {ratio} torch-pruning: {row.get('acc', row.get('error'))}", flush=True)
    return row


def pct(pair) -> str:
    return f"{100.0 * (1 - pair[1] / pair[0]):.0f}%"


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Structured pruning on the trained digits classifiers (no training)",
        "",
        ("`python benchmarks/bench_prune.py` (see its docstring). Accuracy (%) on the 360-sample test split; "
        "calibration: 512 unlabeled `calib` samples."),
        "",
        "## Accuracy",
        "",
        ("onnxshrink columns: widths rounded to 8, so `ratio` 0.3 removes 25-30% of each group's channels. "
        "`recon+lsq` = `--prune-criterion reconstruction --reconstruct`; `default` = the same with the "
        "default rounding (16 on this AVX-512 CPU, rounded up, so narrow groups may stay whole). "
        "TP = Torch-Pruning 1.6.1 MagnitudePruner (L1, round_to=8) on the same trained torch module."),
        "",
        ("| model | ratio | unpruned | l1 | l1+bn | l1+lsq | recon+lsq | -params | -MACs | default | "
        "default -MACs | TP | TP -params | TP -MACs |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in results.items():
        for ratio, r in per["ratios"].items():
            o, t = r["ours"], r["tp"]
            acc = " | ".join(f"{100 * o['acc'][v]:.1f}" for v in VARIANTS)
            r8, rd = o["rounding"]["8"], o["rounding"]["default"]
            tp_cells = (f"failed: {t['error']} | | " if "error" in t
                        else f"{100 * t['acc']:.1f} | {pct(t['params'])} | {pct(t['macs'])}")
            lines.append(
                f"| {name} | {ratio} | {100 * per['base_acc']:.1f} | {acc} | {pct(r8['params'])} | "
                f"{pct(r8['macs'])} | {100 * o['acc_default_rounding']:.1f} | {pct(rd['macs'])} | {tp_cells} |")
    lines += [
        "",
        "## Latency",
        "",
        ("ONNX Runtime CPU, 1 thread, unpruned and pruned interleaved; `speedup` = median unpruned / median "
        "pruned latency at batch 1 and 32; `x MACs` = 1 / (1 - MACs reduction), the speed-up in proportion "
        "to MACs. Rounding: default (16 here), 8, and none (1)."),
        "",
        "| model | ratio | round | -MACs | x MACs | speedup b1 | speedup b32 | TP speedup b1 | TP speedup b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in results.items():
        for ratio, r in per["ratios"].items():
            t = r["tp"]
            for label, rr in r["ours"]["rounding"].items():
                prop = rr["macs"][0] / max(rr["macs"][1], 1)
                tp_cells = ("| " if "error" in t or label != "8"
                            else f"{t['speedup'][1]:.2f}x | {t['speedup'][32]:.2f}x")
                lines.append(f"| {name} | {ratio} | {rr['round_to']} | {pct(rr['macs'])} | {prop:.2f}x | "
                             f"{rr['speedup'][1]:.2f}x | {rr['speedup'][32]:.2f}x | {tp_cells} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--no-torch", action="store_true", help="skip the Torch-Pruning comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    results: dict = {}
    for name in args.models.split(","):
        calib = digits.feeds(name, "calib", batch=64)
        base = accuracy(str(digits.trained_path(name)), name)
        results[name] = {"base_acc": base, "ratios": {}}
        print(f"{name}: unpruned accuracy {base:.4f}", flush=True)
        for ratio in (float(r) for r in args.ratios.split(",")):
            results[name]["ratios"][str(ratio)] = {
                "ours": ours(name, ratio, calib, args.runs),
                "tp": {"error": "skipped (--no-torch)"} if args.no_torch else torch_pruning(name, ratio, args.runs),
            }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(results, indent=1, default=float))
    write_markdown(results, out / "prune.md")
    print((out / "prune.md").read_text())
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
