"""Train the digits classifiers and export them to ONNX (dev tool; needs torch and scikit-learn).

Reproducible: fixed seeds, deterministic torch algorithms, one thread. Writes, under models/digits/:
``data.npz`` (images, labels, split indices), ``<name>.onnx``, ``<name>.weights.npz`` (the torch
state_dict, for ``digits_torch.load_torch``) and ``README.md`` (test accuracies).

Run: python models/train_digits.py [--models cnn,vit] [--data-only]
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


def train_one(name: str) -> dict:
    import torch

    from models import digits_torch

    epochs, lr, wd = RECIPES[name]
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    x, y = digits.model_input(name, "train")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = digits_torch.build(name)
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
            xb = xt[idx] if name == "mlp" else _shift(xt[idx], rng, 1)
            opt.zero_grad()
            loss_fn(model(xb), yt[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return {"model": model, "train_seconds": time.time() - t0}


def export(name: str, model) -> Path:
    import torch

    path = digits.trained_path(name)
    example = torch.zeros((2, 64) if name == "mlp" else (2, 1, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    np.savez_compressed(path.with_suffix(".weights.npz"), **state)
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
    ap.add_argument("--models", default=",".join(digits.TRAINED))
    ap.add_argument("--data-only", action="store_true", help="only (re)write data.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.data_only or not digits.DATA.exists():
        print(f"wrote {digits.make_data()}")
        if args.data_only:
            return 0
    results_file = digits.HERE / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        out = train_one(name)
        export(name, out["model"])
        results[name] = {**evaluate(name, out["model"]), "train_seconds": round(out["train_seconds"], 1)}
        print(name, results[name], flush=True)
    results = {n: results[n] for n in digits.TRAINED if n in results}
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    write_readme(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
