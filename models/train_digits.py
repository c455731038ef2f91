"""Train the digits classifiers and export them to ONNX (dev tool; needs torch and scikit-learn).

Reproducible: fixed seeds, deterministic torch algorithms, one thread. Writes, under models/digits/:
``data.npz`` (images, labels, split indices), ``<name>.onnx``, ``<name>.weights.npz`` (the torch
state_dict, for ``digits_torch.load_torch``) and ``README.md`` (test accuracies).

Run: python models/train_digits.py [--models cnn,vit] [--data-only]

The ``WIDE`` variants (``resnet_wide``, ``mobilenet_wide``: 32x32 inputs, ~100M MACs) take minutes per
epoch on one CPU thread; ``--device cuda --weights-only`` trains them on a GPU and writes only the
weights, then ``--export-only`` (on the CPU machine) exports and evaluates them from those weights,
so every ONNX file comes from the same exporter. GPU training is deterministic but not bit-identical
to CPU training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import digits

#: name -> (epochs, learning rate, weight decay)
RECIPES = {
    "cnn": (40, 2e-3, 1e-4),
    "resnet": (40, 2e-3, 1e-4),
    "mobilenet": (60, 3e-3, 1e-4),
    "inception": (40, 2e-3, 1e-4),
    "mlp": (120, 2e-3, 1e-4),
    "vit": (200, 1e-3, 0.05),
    "resnet_wide": (30, 2e-3, 1e-4),
    "mobilenet_wide": (40, 3e-3, 1e-4),
}
SEED = 0
BATCH = 64

README = """# Trained digits classifiers

Small classifiers trained on scikit-learn's bundled digits (8x8, upsampled to 16x16 bilinear), real data
for quantization and pruning tests. Written by `python models/train_digits.py` (torch, one thread, seed 0,
AdamW + one-cycle schedule, label smoothing 0.05, random 1-pixel shifts for the image models).
Load them with `models.digits` (`trained_path`, `load_split`, `feeds`) and, for torch,
`models.digits_torch.load_torch(name)`.

Test split: 360 held-aside samples (never used for training or calibration). Calib split: 512 samples
of the training part. Accuracy below: ONNX Runtime on the exported model, whole test split.

`resnet_wide` and `mobilenet_wide` (`models.digits.WIDE`) are compute-bound variants for latency
benchmarks: the same architectures twice as wide (the residual net with two blocks) on the digits
upsampled to 32x32; trained on a GPU (`--device cuda --weights-only`, same recipe and seed), exported on
the CPU machine (`--export-only`).

| model | test accuracy | parameters | ONNX nodes | ONNX size | epochs |
|---|---|---|---|---|---|
{{TABLE}}

Files: `<name>.onnx` (opset 17, TorchScript exporter with BatchNormalization kept, dynamic batch `N`),
`<name>.weights.npz` (the torch state_dict), `data.npz` (raw 8x8 images, labels, split indices),
`results.json` (the numbers above).
"""


def _shift(x, rng: np.random.Generator, max_shift: int):
    """Random translation by up to ``max_shift`` pixels (zero padding = background -1)."""
    import torch

    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, [max_shift] * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = rng.integers(0, 2 * max_shift + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(offs):
        out[i] = pad[i, :, dy : dy + h, dx : dx + w]
    return out


def train_one(name: str, device: str = "cpu") -> dict:
    import torch

    from models import digits_torch

    epochs, lr, wd = RECIPES[name]
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    x, y = digits.model_input(name, "train")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).to(device)
    model = digits_torch.build(name).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(x) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            xb = (xt[idx] if name == "mlp" else _shift(xt[idx], rng, 1)).to(device)
            opt.zero_grad()
            loss_fn(model(xb), yt[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return {"model": model.cpu(), "train_seconds": time.time() - t0}


def export(name: str, model) -> Path:
    import torch

    path = digits.trained_path(name)
    size = digits.INPUT_SIZE.get(name, 16)
    example = torch.zeros((2, 64) if name == "mlp" else (2, 1, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    save_weights(name, model)
    return path


def save_weights(name: str, model, folder: Path | None = None) -> Path:
    path = (folder or digits.HERE) / f"{name}.weights.npz"
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    np.savez_compressed(path, **state)
    return path


def evaluate(name: str, model) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    path = digits.trained_path(name)
    onnx.checker.check_model(str(path), full_check=True)
    x, y = digits.model_input(name, "test")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    return {
        "test_accuracy": digits.accuracy(got, y),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "onnx_bytes": path.stat().st_size,
        "nodes": len(onnx.load(str(path)).graph.node),
    }


def write_readme(results: dict) -> None:
    rows = [
        f"| {n} | {r['test_accuracy'] * 100:.2f}% | {r['parameters']:,} | {r['nodes']} | "
        f"{r['onnx_bytes'] / 1024:.0f} KiB | {RECIPES[n][0]} |"
        for n, r in results.items()
    ]
    (digits.HERE / "README.md").write_text(README.replace("{{TABLE}}", "\n".join(rows)))


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(digits.TRAINED), help=f"any of {', '.join(digits.ALL)}")
    ap.add_argument("--data-only", action="store_true", help="only (re)write data.npz")
    ap.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda); with --export-only, "
                    "the device the weights were trained on (recorded in results.json)")
    ap.add_argument("--weights-only", metavar="DIR", help="train, write DIR/<name>.weights.npz, export nothing")
    ap.add_argument("--export-only", action="store_true",
                    help="export and evaluate from the committed <name>.weights.npz (no training)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.device.startswith("cuda"):
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if args.data_only or not digits.DATA.exists():
        print(f"wrote {digits.make_data()}")
        if args.data_only:
            return 0
    results_file = digits.HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if args.export_only:
            from models import digits_torch

            model, seconds = digits_torch.load_torch(name), results.get(name, {}).get("train_seconds")
        else:
            out = train_one(name, args.device)
            model, seconds = out["model"], round(out["train_seconds"], 1)
            if args.weights_only:
                print(name, save_weights(name, model, Path(args.weights_only)), f"{seconds} s", flush=True)
                continue
        export(name, model)
        results[name] = {**evaluate(name, model), "train_seconds": seconds,
                         **({"train_device": args.device} if args.device != "cpu" else {})}
        print(name, results[name], flush=True)
    if args.weights_only:
        return 0
    results = {n: results[n] for n in digits.ALL if n in results}
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
