"""Trained digit classifiers on real data (scikit-learn's bundled 8x8 digits), and their data splits.

The models under ``models/digits/`` were trained by ``models/train_digits.py`` (torch, dev only) and
exported to ONNX (opset 17, TorchScript exporter, BatchNormalization kept, dynamic batch "N"):

- input ``"input"`` float32 [N,1,16,16] (``mlp``: [N,64]; the ``WIDE`` variants: [N,1,32,32]), output
  ``"logits"`` float32 [N,10];
- images are the 8x8 digits scaled to [0, 1] (``/16``), upsampled to 16x16 with bilinear interpolation
  (half-pixel centers, like ``torch.nn.functional.interpolate(..., align_corners=False)``), then
  normalized as ``(x - 0.5) / 0.5``; the MLP takes the 8x8 image flattened, normalized the same way.

``WIDE`` holds compute-bound variants for latency benchmarks (``resnet_wide``, ``mobilenet_wide``: the
residual and inverted-residual architectures twice as wide, on 32x32 upsampled inputs); they are not in
``TRAINED``, so the tests that loop over ``TRAINED`` stay fast.

Splits (``models/digits/data.npz`` holds the raw 8x8 images, labels and index arrays, so no
scikit-learn is needed to read them): ``test`` = 360 samples held aside (stratified, seed 0), never
used for training or calibration; ``train`` = the other 1437; ``calib`` = 512 of the train samples
(used unlabeled, for calibration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "digits"
DATA = HERE / "data.npz"
TRAINED = ("cnn", "resnet", "mobilenet", "inception", "mlp", "vit")
#: compute-bound variants (32x32 input), used by the pruning latency benchmark
WIDE = ("resnet_wide", "mobilenet_wide")
ALL = TRAINED + WIDE
#: input side of the image models (pixels); 16 unless listed
INPUT_SIZE = {"resnet_wide": 32, "mobilenet_wide": 32}
SPLITS = ("train", "calib", "test")
TEST_SIZE = 360
CALIB_SIZE = 512
SPLIT_SEED = 0


def trained_path(name: str) -> Path:
    """Path of the committed ONNX file of trained model ``name`` (one of ``TRAINED`` or ``WIDE``)."""
    if name not in ALL:
        raise KeyError(f"unknown digits model {name!r}; known: {', '.join(ALL)}")
    return HERE / f"{name}.onnx"


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row i holds the bilinear weights of output pixel i over input pixels (half-pixel centers)."""
    m = np.zeros((n_out, n_in), np.float64)
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upsample(images: np.ndarray, size: int = 16) -> np.ndarray:
    """Bilinear upsampling of [n, h, w] images to [n, size, size] (float32)."""
    rows = _interp_matrix(images.shape[1], size)
    cols = _interp_matrix(images.shape[2], size)
    return np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols).astype(np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return ((x - 0.5) / 0.5).astype(np.float32)


def _raw() -> dict[str, np.ndarray]:
    if not DATA.exists():
        raise FileNotFoundError(f"{DATA} is missing; run python models/train_digits.py --data-only")
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


def load_split(split: str, flat: bool = False, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a split: x float32 [n,1,size,size] (``flat``: the 8x8 image as [n,64]), y int64 [n]."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    raw = _raw()
    idx = raw[f"{split}_idx"]
    images = raw["images"][idx].astype(np.float32) / 16.0
    y = raw["labels"][idx].astype(np.int64)
    if flat:
        return _normalize(images.reshape(len(idx), 64)), y
    return _normalize(upsample(images, size))[:, None], y


def model_input(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of ``split`` shaped for model ``name`` (flat for the MLP)."""
    trained_path(name)
    return load_split(split, flat=(name == "mlp"), size=INPUT_SIZE.get(name, 16))


def feeds(name: str, split: str, batch: int = 32, limit: int | None = None) -> list[dict]:
    """The split as a list of ``{"input": x}`` feeds of up to ``batch`` samples (first ``limit`` samples)."""
    x, _ = model_input(name, split)
    x = x[:limit] if limit else x
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == y).mean())


def make_data(path: Path = DATA) -> Path:
    """Write the raw images, labels and split indices (needs scikit-learn; dev only)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images, labels = d.images.astype(np.uint8), d.target.astype(np.uint8)
    all_idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    rng = np.random.default_rng(SPLIT_SEED)
    calib_idx = np.sort(rng.choice(train_idx, CALIB_SIZE, replace=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, images=images, labels=labels, train_idx=np.sort(train_idx).astype(np.int16),
        calib_idx=calib_idx.astype(np.int16), test_idx=np.sort(test_idx).astype(np.int16),
    )
    return path
