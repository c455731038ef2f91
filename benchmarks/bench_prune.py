"""onnxshrink structured pruning on the trained digits classifiers, beside Torch-Pruning's magnitude pruner.

For each model (resnet, mobilenet, inception, cnn, mlp, vit, and the compute-bound 32x32 variants
resnet_wide and mobilenet_wide) and ratio (0.3, 0.5), without any training:

- onnxshrink, data-free: ``l1`` criterion, no reconstruction;
- onnxshrink ``l1`` + least-squares reconstruction (``--reconstruct``) and ``l1`` + BN re-estimation;
- onnxshrink ``reconstruction`` criterion (greedy least-squares saliency) + least-squares reconstruction;
- Torch-Pruning 1.6 ``MagnitudePruner`` (L1 group magnitude, the same ratio, classifier ignored,
  ``round_to=8``) on the same trained torch module, evaluated in torch;
- pruning targets (``--prune-target``), all ``recon+lsq`` with the default rounding: ``channels`` (the
  ratio of every group's channels, today's default), ``latency`` (the ratio of the estimated latency,
  widths chosen per group by the latency-aware allocator) and ``latency=ch`` (the latency target with
  the channels plan's estimated latency as its budget: the same estimated speed, widths allocated).

Calibration: the 512-sample ``calib`` split (unlabeled); accuracy: the 360-sample ``test`` split.
Params and MACs: onnxshrink's counters on the ONNX models (Torch-Pruning's own counter for its models).
Latency targets are estimated with the default kernel table (``onnxshrink.kernel_table.DEFAULT``) unless
``--kernel-table measure``.
Accuracy variants use widths rounded to 8 (25-30% of each group at ratio 0.3); the best variant is also
run with the default rounding (ONNX Runtime's NCHWc block: 16 with AVX-512, else 8). Latency: ONNX Runtime CPU,
1 thread, batch 1 and batch 32; per model and ratio, every candidate (widths rounded to the default, to 8
and not rounded; Torch-Pruning's model exported with ``torch.onnx.export``) and two references (the
unpruned model as trained, and the same after onnxshrink's cleanup and lossless passes, i.e. ``prune``
at ratio 0) run interleaved round by round, the order flipping every round, so load changes on the
shared machine hit all alike; ``speedup`` = median(reference) / median(candidate). Widths depend only
on the ratio and the rounding, not on the criterion, so one latency row serves every variant. The 1-minute
load average is recorded before and after each model's timing (other jobs share the CPU).

    /work/venv/bin/python benchmarks/bench_prune.py [--models resnet,mlp] [--ratios 0.3,0.5]
        [--runs 200] [--out benchmarks/results] [--merge]
    /work/venv/bin/python benchmarks/bench_prune.py --render benchmarks/results/prune.json  # tables only

Dev only: needs torch and torch-pruning (``pip install torch==2.13.0 torch-pruning``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import kept_reading
from models import digits
from onnxshrink import bench, pruning, runtime
from onnxshrink.errors import ConfigError

MODELS = ("resnet", "mobilenet", "inception", "cnn", "mlp", "vit", "resnet_wide", "mobilenet_wide")
ROUNDINGS = {"default": {}, "8": {"round_to": 8}, "1": {"round_to": 1, "min_width": 1}}
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


def interleaved(paths: dict[str, str], feed: dict, runs: int, warmup: int = 10) -> dict[str, list[float]]:
    """Seconds per run of each model, all timed round by round (order flipping every round)."""
    sessions = {k: runtime.make_session(p, threads=1) for k, p in paths.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for i in range(runs):
        for k in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return times


def speedups(name: str, paths: dict[str, str], runs: int) -> dict:
    """Per batch: medians (ms) and speed-ups of every candidate against both references."""
    x, _ = digits.model_input(name, "test")
    out: dict = {"load": [round(os.getloadavg()[0], 2)]}
    for batch in (1, 32):
        times = interleaved(paths, {"input": x[:batch]}, runs if batch == 1 else max(runs // 4, 30))
        out[batch] = {"median_ms": {k: 1000 * float(np.median(t)) for k, t in times.items()}}
        for ref in ("unpruned", "cleaned"):
            out[batch][f"vs_{ref}"] = {k: bench.paired_ratio(times[ref], t, bootstrap=0).speedup
                                       for k, t in times.items() if k not in ("unpruned", "cleaned")}
        out[batch]["cleanup"] = bench.paired_ratio(times["unpruned"], times["cleaned"], bootstrap=0).speedup
    out["load"].append(round(os.getloadavg()[0], 2))
    return out


def ours(name: str, ratio: float, calib, tmp: Path, kernels=None) -> tuple[dict, dict[str, str]]:
    """Accuracy of every variant with widths rounded to 8 (25-30% of each group's channels), accuracy of
    the best variant with the default rounding, and the pruned models of each rounding (for timing)."""
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
    cands = _targets(name, path, ratio, calib, tmp, default, row, kernels)
    for label, opts in ROUNDINGS.items():
        cands[label] = str(tmp / f"{ratio}_{label}.onnx")
        result = pruning.prune(path, ratio, cands[label], **opts)
        row["rounding"][label] = {
            "round_to": result.plan.settings["round_to"],
            "params": [result.before["parameters"], result.after["parameters"]],
            "macs": [result.before["macs"], result.after["macs"]],
        }
    return row, cands


def _targets(name: str, path: str, ratio: float, calib, tmp: Path, default, row: dict,
             kernels=None) -> dict[str, str]:
    """Accuracy, MACs and estimate of the channels plan and the latency-budgeted plans (recon+lsq);
    the pruned models of the latency plans (for timing; the channels plan times as ``default``)."""
    row["targets"] = {"channels": _target_row(default, name, ratio)}
    est = default.plan.settings["estimate"]["latency_us"]
    runs = {"latency": ratio, "latency=ch": 1.0 - est[1] / est[0]}
    cands = {}
    for label, r in runs.items():
        out = tmp / f"{ratio}_{label}.onnx"
        t0 = time.perf_counter()
        try:
            res = pruning.prune(path, r, out, target="latency", kernels=kernels, calibration=calib,
                                **VARIANTS["recon+lsq"])
        except ConfigError as e:
            row["targets"][label] = {"ratio": r, "error": str(e)}
            print(f"  {name} {ratio} {label}: {e}", flush=True)
            continue
        row["targets"][label] = {**_target_row(res, name, r), "seconds": round(time.perf_counter() - t0, 1)}
        cands[label] = str(out)
        print(f"  {name} {ratio} {label}: acc {row['targets'][label]['acc']:.4f} "
              f"{res.plan.target_text()}", flush=True)
    return cands


def _target_row(result, name: str, ratio: float) -> dict:
    plan = result.plan
    return {"ratio": ratio, "acc": accuracy(result.model, name), "target": plan.settings.get("target", "channels"),
            "macs": [result.before["macs"], result.after["macs"]],
            "params": [result.before["parameters"], result.after["parameters"]],
            "estimate": plan.settings.get("estimate"), "text": plan.target_text(),
            "check": plan.settings.get("check"),
            "widths": [[g.atoms * g.channels_per_atom, g.kept_channels] for g in plan.groups
                       if g.status in ("pruned", "unchanged")]}


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


def torch_pruning(name: str, ratio: float, tmp: Path) -> tuple[dict, str | None]:
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
    out = None
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
        out = str(tmp / f"tp_{ratio}.onnx")
        torch.onnx.export(model, example, out, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}}, opset_version=17, dynamo=False)
    except Exception as e:  # noqa: BLE001 - report what Torch-Pruning could not do
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        out = None
    print(f"  {name} {ratio} torch-pruning: {row.get('acc', row.get('error'))}", flush=True)
    return row, out


def pct(pair) -> str:
    return f"{100.0 * (1 - pair[1] / pair[0]):.0f}%"


def run_model(name: str, ratios, runs: int, with_torch: bool, kernels=None) -> dict:
    calib = digits.feeds(name, "calib", batch=64)
    path = str(digits.trained_path(name))
    entry: dict = {"base_acc": accuracy(path, name), "ratios": {}}
    print(f"{name}: unpruned accuracy {entry['base_acc']:.4f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        cleaned = str(Path(tmp) / "cleaned.onnx")
        pruning.prune(path, 0.0, cleaned)
        for ratio in ratios:
            row, cands = ours(name, ratio, calib, Path(tmp), kernels)
            tp, tp_path = torch_pruning(name, ratio, Path(tmp)) if with_torch else ({"error": "skipped"}, None)
            paths = {"unpruned": path, "cleaned": cleaned, **cands, **({"tp": tp_path} if tp_path else {})}
            lat = speedups(name, paths, runs)
            for label in cands:
                entry_ = row["rounding"].get(label) or row["targets"][label]
                entry_["speedup"] = {b: lat[b]["vs_unpruned"][label] for b in (1, 32)}
                entry_["speedup_vs_cleaned"] = {b: lat[b]["vs_cleaned"][label] for b in (1, 32)}
            for key in ("speedup", "speedup_vs_cleaned"):
                row["targets"]["channels"][key] = row["rounding"]["default"][key]
            if tp_path:
                tp["speedup"] = {b: lat[b]["vs_unpruned"]["tp"] for b in (1, 32)}
            row["cleanup_speedup"] = {b: lat[b]["cleanup"] for b in (1, 32)}
            row["median_ms"] = {b: lat[b]["median_ms"] for b in (1, 32)}
            row["load"] = lat["load"]
            d = row["rounding"]["default"]
            print(f"  {name} {ratio} default: -MACs {pct(d['macs'])} speedup {d['speedup']} "
                  f"(load {lat['load']})", flush=True)
            entry["ratios"][str(ratio)] = {"ours": row, "tp": tp}
    return entry


def _x(pair) -> float:
    return pair[0] / max(pair[1], 1)


def machine() -> dict:
    """This CPU's name and ONNX Runtime's NCHWc block (the default rounding step)."""
    from onnxshrink import ort_blocks

    return {"cpu": ort_blocks.cpu_name(), "nchwc_block": ort_blocks.nchwc_block_size()}


def write_markdown(results: dict, path: Path) -> None:
    reading = kept_reading(path)
    machine = results.get(MACHINE_KEY)
    results = {k: v for k, v in results.items() if k != MACHINE_KEY}
    block = (f"{machine['nchwc_block']} on this CPU" if machine
             else "16 on the AVX-512 Xeon these figures come from")
    lines = [
        "# Structured pruning on the trained digits classifiers (no training)",
        "",
        *([(f"Machine: {machine['cpu']}; ONNX Runtime NCHWc block {machine['nchwc_block']} (the default "
           "rounding step)."), ""] if machine else []),
        ("`python benchmarks/bench_prune.py` (see its docstring). Accuracy (%) on the 360-sample test split; "
        "calibration: 512 unlabeled `calib` samples. `resnet_wide` and `mobilenet_wide` are compute-bound "
        "variants (32x32 inputs, 135M and 105M MACs per image; see `models/digits/README.md`)."),
        "",
        "## Accuracy",
        "",
        ("onnxshrink columns: widths rounded to 8, so `ratio` 0.3 removes 25-30% of each group's channels. "
        "`recon+lsq` = `--prune-criterion reconstruction --reconstruct`; `default` = the same with the "
        f"default rounding (ONNX Runtime's NCHWc block, {block}, rounded up, so narrow groups "
        "may stay whole). TP = Torch-Pruning 1.6.1 MagnitudePruner (L1, round_to=8) on the same trained "
        "torch module."),
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
    lines += _goal_table(results) + _targets_table(results) + _latency_table(results, block)
    path.write_text("\n".join(lines) + "\n" + reading)


def _goal_table(results: dict) -> list[str]:
    lines = [
        "",
        "## Latency against MACs, default rounding",
        "",
        ("ONNX Runtime CPU, 1 thread; all models of one row timed interleaved. `x MACs` = 1 / (1 - MACs "
        "reduction), the speed-up in proportion to MACs. `b1`/`b32`: speed-up over the unpruned model as "
        "trained at batch 1/32; `b1 cl`/`b32 cl`: over the same model after onnxshrink's cleanup and lossless "
        "passes (ratio 0), i.e. pruning's own share; `cleanup`: cleaned over as-trained (b1/b32). `>= MACs`: "
        "both batch speed-ups over the unpruned model at least `x MACs`; `of x MACs`: b1 and b32 speed-ups as a "
        "share of `x MACs`; `never slower`: both >= 1. "
        "`ms b1`/`ms b32`: median latency, unpruned -> pruned. `load`: 1-minute load average before/after "
        "the row's timing (2 cores, shared)."),
        "",
        ("| model | ratio | -MACs | x MACs | b1 | b32 | of x MACs | b1 cl | b32 cl | cleanup | >= MACs | "
        "never slower | ms b1 | ms b32 | load |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in results.items():
        for ratio, r in per["ratios"].items():
            o = r["ours"]
            d, ms = o["rounding"]["default"], o["median_ms"]
            s, c = d["speedup"], d["speedup_vs_cleaned"]
            prop = _x(d["macs"])
            meets, never = _verdicts(s, d["macs"])
            lines.append(
                f"| {name} | {ratio} | {pct(d['macs'])} | {prop:.2f}x | {s[1]:.2f}x | {s[32]:.2f}x | "
                f"{100 * s[1] / prop:.0f}%/{100 * s[32] / prop:.0f}% | "
                f"{c[1]:.2f}x | {c[32]:.2f}x | {o['cleanup_speedup'][1]:.2f}/{o['cleanup_speedup'][32]:.2f} | "
                f"{meets} | {never} | {_ms(ms[1]['unpruned'])} -> {_ms(ms[1]['default'])} | "
                f"{_ms(ms[32]['unpruned'])} -> {_ms(ms[32]['default'])} | {o['load'][0]}-{o['load'][1]} |")
    return lines


def _targets_table(results: dict) -> list[str]:
    lines = [
        "",
        "## Pruning targets: channels against latency budgets (recon+lsq, default rounding)",
        "",
        ("`channels`: the ratio of every group's channels (`--prune-target channels`, the default); `latency`: "
        "the ratio of the estimated latency (`--prune-target latency`: widths chosen per group, in rounding steps, "
        "keeping the most importance per microsecond saved); `latency=ch`: the latency target with the "
        "channels plan's estimated latency as the budget. `budget`: what the ratio asked for; `est`: the "
        "planner's latency estimate (batch 1, default kernel table) as a share of unpruned (and as a speed-up, "
        "to set beside `b1`); `acc` (%) and "
        "its change from unpruned, `acc goal`: within 1 point at 0.3, 3 at 0.5; `b1`/`b32`: measured speed-up "
        "over unpruned (the same interleaved runs as above); `of x MACs` and `>= MACs` as above; `widths`: "
        "kept/unpruned channels per prunable group; `kept (drift)`: for the latency targets, which plan "
        "`prune` kept after building both the allocated widths and the uniform plan that fits the same "
        "estimate (`uniform r`: r of every group's channels), with the drift (1 - cosine) of each on the "
        "held-out calibration feeds (a quarter, at most 8; both refit on the others), kept first."),
        "",
        ("| model | ratio | target | budget | est | acc | d acc | acc goal | -MACs | x MACs | b1 | b32 | "
        "of x MACs | >= MACs | never slower | widths | kept (drift) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in results.items():
        base = 100 * per["base_acc"]
        for ratio, r in per["ratios"].items():
            for label, t in r["ours"].get("targets", {}).items():
                budget = (f"{float(ratio):.0%} of channels" if label == "channels"
                          else f"latency {1 - t['ratio']:.0%}")
                if "error" in t:
                    lines.append(f"| {name} | {ratio} | {label} | {budget} | out of reach | | | | | | | | | | | | |")
                    continue
                lines.append(_target_line(name, ratio, label, budget, t, base))
    return lines


def _target_line(name, ratio, label, budget, t, base) -> str:
    lat = (t.get("estimate") or {}).get("latency_us") or [1, 1]
    acc = 100 * t["acc"]
    goal = "yes" if acc >= base - (1.0 if float(ratio) < 0.4 else 3.0) - 1e-9 else "**no**"
    prop = _x(t["macs"])
    s = t.get("speedup")
    speed = (f"{s[1]:.2f}x | {s[32]:.2f}x | {100 * s[1] / prop:.0f}%/{100 * s[32] / prop:.0f}% | "
             + " | ".join(_verdicts(s, t["macs"])) if s else "| | | |")
    widths = " ".join(f"{b}" if a == b else f"{a}>{b}" for a, b in t.get("widths", []))
    return (f"| {name} | {ratio} | {label} | {budget} | {lat[1] / lat[0]:.0%} ({lat[0] / lat[1]:.2f}x) | {acc:.1f} | "
            f"{acc - base:+.1f} | "
            f"{goal} | {pct(t['macs'])} | {prop:.2f}x | {speed} | {widths} | {kept_text(t.get('check'))} |")


def kept_text(check) -> str:
    """Which plan ``prune``'s uniform check kept, with both drifts (kept first); empty where none ran."""
    if not check:
        return ""
    tried = sorted(check["tried"], key=lambda x: x["plan"] != check["kept"])
    names = {t["plan"]: (f"uniform r={t['uniform_ratio']:g}" if t["plan"] == "uniform" else "allocated")
             for t in tried}
    return f"{names[tried[0]['plan']]} ({tried[0]['drift']:.3g} vs {tried[1]['drift']:.3g})"


def _verdicts(s: dict, macs) -> tuple[str, str]:
    """(`>= MACs`, `never slower`); a model with nothing pruned (the same MACs) gets neither."""
    if macs[1] >= macs[0]:
        return "nothing pruned", "nothing pruned"
    return ("yes" if min(s[1], s[32]) >= _x(macs) else "no"), ("yes" if min(s[1], s[32]) >= 1 else "**no**")


def _ms(v: float) -> str:
    return f"{1000 * v:.0f} us" if v < 1 else f"{v:.3g} ms"


def _latency_table(results: dict, block: str) -> list[str]:
    lines = [
        "",
        "## Latency by rounding",
        "",
        ("Speed-up over the unpruned model as trained (same runs as above). Rounding: default (ONNX Runtime's "
        f"NCHWc block, {block}), 8, and none (1). TP: Torch-Pruning's model (round_to=8), on the `8` row."),
        "",
        "| model | ratio | round | -MACs | x MACs | speedup b1 | speedup b32 | TP speedup b1 | TP speedup b32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in results.items():
        for ratio, r in per["ratios"].items():
            t = r["tp"]
            for label, rr in r["ours"]["rounding"].items():
                tp_cells = ("| " if "error" in t or label != "8"
                            else f"{t['speedup'][1]:.2f}x | {t['speedup'][32]:.2f}x")
                shown = f"{rr['round_to']} (default)" if label == "default" else rr["round_to"]
                lines.append(f"| {name} | {ratio} | {shown} | {pct(rr['macs'])} | {_x(rr['macs']):.2f}x | "
                             f"{rr['speedup'][1]:.2f}x | {rr['speedup'][32]:.2f}x | {tp_cells} |")
    return lines


BATCH_KEYED = ("speedup", "speedup_vs_cleaned", "cleanup_speedup", "median_ms")


#: Key of the machine record (CPU, NCHWc block) in prune.json, beside the models.
MACHINE_KEY = "_machine"


def _int_keys(obj):
    """JSON turned the batch keys 1 and 32 (under ``BATCH_KEYED``) into strings; turn them back."""
    if isinstance(obj, dict):
        return {k: ({int(b): v2 for b, v2 in v.items()} if k in BATCH_KEYED else _int_keys(v))
                for k, v in obj.items()}
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--no-torch", action="store_true", help="skip the Torch-Pruning comparison")
    ap.add_argument("--kernel-table", default=None, help="kernel table of the latency targets (default|measure|JSON)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render", metavar="JSON", help="only rewrite prune.md from this prune.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' results in the existing prune.json (rerun some models only)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        out.mkdir(parents=True, exist_ok=True)
        write_markdown(_int_keys(json.loads(Path(args.render).read_text())), out / "prune.md")
        return 0
    ratios = [float(r) for r in args.ratios.split(",")]
    results = {name: run_model(name, ratios, args.runs, not args.no_torch, args.kernel_table)
               for name in args.models.split(",")}
    old = out / "prune.json"
    if args.merge and old.exists():
        kept = _int_keys(json.loads(old.read_text()))
        kept.pop(MACHINE_KEY, None)
        results = {name: results.get(name, kept.get(name)) for name in [*MODELS, *results, *kept]
                   if name in results or name in kept}
    results[MACHINE_KEY] = machine()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune.json").write_text(json.dumps(results, indent=1, default=float))
    write_markdown(results, out / "prune.md")
    print((out / "prune.md").read_text())
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
