"""Real trained models from PyPI wheels, fetched once (``pip download --no-deps``) and cached.

Wheels go to ``~/.cache/onnxshrink/wheels``, the extracted ``.onnx`` files to
``~/.cache/onnxshrink/models/<package>-<version>/``; versions and file sha256 are pinned.

Models (``REAL``) and their inputs:

- ``ppocr_cls`` (rapidocr-onnxruntime 1.3.24, ``ch_ppocr_mobile_v2.0_cls_infer.onnx``, Paddle export,
  opset 11): text-line orientation classifier. Input ``x`` float32 [N,3,48,192] (RapidOCR resizes a crop
  to height 48, pads the width to 192, normalizes ``(x/255 - 0.5)/0.5``, CHW, BGR); output [N,2]
  softmax over (0 deg, 180 deg).
- ``ppocr_det`` (same wheel, ``ch_PP-OCRv4_det_infer.onnx``, opset 12): DB text detector. Input ``x``
  float32 [1,3,H,W], H and W multiples of 32, ImageNet-normalized ``(x/255 - mean)/std``; output the
  text probability map [1,1,H,W].
- ``ppocr_rec`` (same wheel, ``ch_PP-OCRv4_rec_infer.onnx``, opset 12, SVTR-LCNet with attention):
  text recognizer. Input ``x`` float32 [N,3,48,W] (RapidOCR uses W=320), normalized ``(x/255 - 0.5)/0.5``;
  output [N,W/8,6625] per-step character probabilities (CTC).
- ``silero_vad`` (silero-vad 6.2.3, ``silero_vad.onnx``, opset 16): a stateful voice activity detector,
  the whole network inside an ``If`` on the sample rate (nested Ifs, an LSTM). Inputs ``input`` float32
  [N, 64 + 512] (a 512-sample chunk at 16 kHz with the last 64 samples of the previous chunk prepended,
  as the silero wrapper does), ``state`` float32 [2,N,128] (zeros at the start of a stream, then the
  previous ``stateN``), ``sr`` int64 scalar 16000; outputs ``output`` [N,1] speech probability and
  ``stateN`` [2,N,128].

``EXTRA`` names more variants from the same wheels (used by the benchmarks): ``silero_vad_op15`` (a
TorchScript export, opset 15, without the outer If) and ``silero_vad_ifless`` (opset 18, one If).

Run ``python models/fetch_real.py`` to fetch all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "onnxshrink"
WHEELS = CACHE / "wheels"
MODELS = CACHE / "models"


class FetchError(RuntimeError):
    """A real model could not be fetched (no network, package missing, checksum mismatch)."""


@dataclasses.dataclass(frozen=True)
class Source:
    package: str
    version: str
    member: str  # path of the .onnx inside the wheel
    sha256: str


_OCR = ("rapidocr-onnxruntime", "1.3.24")
_VAD = ("silero-vad", "6.2.3")
SOURCES: dict[str, Source] = {
    "ppocr_cls": Source(*_OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    "ppocr_det": Source(*_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    "ppocr_rec": Source(*_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    "silero_vad": Source(*_VAD, "silero_vad/data/silero_vad.onnx",
                         "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
    "silero_vad_op15": Source(*_VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
                              "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"),
    "silero_vad_ifless": Source(*_VAD, "silero_vad/data/silero_vad_op18_ifless.onnx",
                                "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"),
}
REAL = ("ppocr_cls", "ppocr_det", "ppocr_rec", "silero_vad")
EXTRA = ("silero_vad_op15", "silero_vad_ifless")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel_for(src: Source) -> Path | None:
    stem = f"{src.package.replace('-', '_')}-{src.version}-"
    found = sorted(p for p in WHEELS.glob(f"{stem}*.whl") if p.is_file())
    return found[0] if found else None


def _download(src: Source) -> Path:
    """The cached wheel of ``src``, downloaded with pip into a temp dir first (safe when run twice)."""
    wheel = _wheel_for(src)
    if wheel is not None:
        return wheel
    WHEELS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEELS, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{src.package}=={src.version}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"pip download of {src.package}=={src.version} failed: {e}") from e
        got = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise FetchError(f"pip download of {src.package}=={src.version} failed: {' / '.join(tail)}")
        os.replace(got[0], WHEELS / got[0].name)
    return WHEELS / got[0].name


def fetch(name: str) -> Path:
    """Path of the cached ``.onnx`` of real model ``name``, downloading and extracting it if needed.

    Raises ``FetchError`` when the wheel cannot be had or the file's sha256 is not the pinned one.
    """
    if name not in SOURCES:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    dest = MODELS / f"{src.package}-{src.version}" / Path(src.member).name
    if dest.is_file() and _sha256(dest) == src.sha256:
        return dest
    wheel = _download(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        digest = _sha256(tmp)
        if digest != src.sha256:
            raise FetchError(f"{name}: {src.member} in {wheel.name} has sha256 {digest}, pinned "
                             f"{src.sha256}; delete {wheel} and fetch again")
        os.replace(tmp, dest)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{name}: cannot extract {src.member} from {wheel}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("fetched %s -> %s", name, dest)
    return dest


# ---------------------------------------------------------------- plausible inputs


def _text_image(rng: np.random.Generator, h: int, w: int, lines: int) -> np.ndarray:
    """A uint8 HxWx3 page: light, slightly noisy paper with dark glyph-like strokes on ``lines`` rows."""
    img = rng.normal(235, 8, (h, w, 1)) + rng.normal(0, 4, (1, 1, 3))
    line_h = h / lines
    for li in range(lines):
        size = int(line_h * rng.uniform(0.45, 0.7))
        top = int(li * line_h + (line_h - size) / 2)
        x = int(rng.uniform(0.02, 0.15) * w)
        end = int(rng.uniform(0.6, 0.98) * w)
        ink = rng.uniform(10, 80, 3)
        while x + size // 2 < end:
            gw = int(size * rng.uniform(0.5, 1.0))
            for _ in range(rng.integers(2, 5)):  # strokes of one glyph
                if rng.random() < 0.5:
                    y0, t = top + rng.integers(0, size), max(1, size // 8)
                    img[y0 : y0 + t, x : x + gw] = ink
                else:
                    x0, t = x + rng.integers(0, gw), max(1, size // 8)
                    img[top : top + size, x0 : x0 + t] = ink
            x += gw + int(size * rng.uniform(0.1, 0.4))
    return np.clip(img, 0, 255).astype(np.uint8)


def _chw(img: np.ndarray, mean, std) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def _crops(rng, n: int, h: int, w: int) -> np.ndarray:
    """``n`` normalized text-line crops [n,3,h,w]; some are upside down (the classifier's 180 class),
    some narrower than ``w`` and zero-padded on the right as RapidOCR does."""
    out = np.zeros((n, 3, h, w), np.float32)
    for i in range(n):
        cw = int(w * rng.uniform(0.5, 1.0))
        img = _text_image(rng, h, cw, 1)
        if rng.random() < 0.3:
            img = img[::-1, ::-1]
        out[i, :, :, :cw] = _chw(img, 0.5, 0.5)
    return out


def _speech(rng: np.random.Generator, n_samples: int, sr: int = 16000) -> np.ndarray:
    """Speech-like audio: voiced harmonic bursts with a syllable envelope, plus background noise."""
    t = np.arange(n_samples) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6.3)), 0, None) ** 2
    audio = rng.uniform(0.05, 0.3) * envelope * voiced + rng.normal(0, 0.005, n_samples)
    return audio.astype(np.float32)


def example_feeds(name: str, n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` plausible input feeds for real model ``name`` (see the module docstring for shapes)."""
    rng = np.random.default_rng(seed)
    if name == "ppocr_cls":
        return [{"x": _crops(rng, 6, 48, 192)} for _ in range(n)]
    if name == "ppocr_rec":
        return [{"x": _crops(rng, 2, 48, 320)} for _ in range(n)]
    if name == "ppocr_det":
        sizes = [(320, 320), (256, 384), (384, 288)]
        feeds = []
        for i in range(n):
            h, w = sizes[(seed + i) % len(sizes)]
            img = _text_image(rng, h, w, int(rng.integers(3, 7)))
            feeds.append({"x": _chw(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]})
        return feeds
    if name.startswith("silero_vad"):
        return [_vad_feed(rng) for _ in range(n)]
    raise KeyError(f"no example inputs for {name!r}; known: {', '.join(SOURCES)}")


def _vad_feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    audio = _speech(rng, 64 + 512)[None]
    return {"input": audio, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for name in (*REAL, *EXTRA):
        try:
            print(f"{name:20s} {fetch(name)}")
        except FetchError as e:
            failed += 1
            print(f"{name:20s} FAILED: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
