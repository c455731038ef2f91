"""One quantization by another tool (NNCF, Intel Neural Compressor, ONNX Runtime), run in its own process.

Called by ``bench_quantize_anchors.py`` with the anchors' Python (a venv of its own: NNCF and Neural
Compressor pin their own numpy and scipy), so it imports nothing from onnxshrink:

    ANCHOR_PYTHON benchmarks/_anchor_quantizers.py '{"tool": "nncf", "config": "default", "src": ...,
        "calib_dir": ..., "out": ...}'

Prints one JSON line: the tool's version, its wall time and this process's peak RSS (``VmHWM``).
Each config is the tool's documented call with its defaults, changed only where the config's name says.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def feeds(folder) -> list[dict[str, np.ndarray]]:
    out = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as z:
            out.append({k: z[k] for k in z.files})
    return out


def nncf_quantize(job: dict) -> str:
    """``nncf.quantize`` on the ONNX model: every calibration feed (``subset_size``), its default preset
    (symmetric activations, or ``mixed`` for transformers) and fast bias correction; ``accurate``: the
    full bias correction (``fast_bias_correction=False``), ``transformer``: ``model_type=TRANSFORMER``."""
    import nncf
    import onnx

    data = feeds(job["calib_dir"])
    config = job["config"]
    kwargs = {"subset_size": len(data)}
    if "accurate" in config:
        kwargs["fast_bias_correction"] = False
    if "transformer" in config:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    model = onnx.load(job["src"])
    quantized = nncf.quantize(model, nncf.Dataset(data), **kwargs)
    onnx.save(quantized, job["out"])
    return nncf.__version__


def inc_quantize(job: dict) -> str:
    """Intel Neural Compressor for ONNX (``onnx-neural-compressor``): ``quantize`` with
    ``StaticQuantConfig``. ``default``: its defaults (QOperator format, uint8 activations, per-tensor
    weights, MinMax); ``qdq``: QDQ format with per-channel weights (what a CPU deployment would pick)."""
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize
    from onnx_neural_compressor.version import __version__
    from onnxruntime.quantization import QuantFormat

    data = feeds(job["calib_dir"])

    class Reader(data_reader.CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return data[self.i - 1] if self.i <= len(data) else None

        def rewind(self):
            self.i = 0

    kwargs = {"calibration_sampling_size": len(data)}
    if job["config"] == "qdq":
        kwargs.update(quant_format=QuantFormat.QDQ, per_channel=True)
    quantize(job["src"], job["out"], inc_config.StaticQuantConfig(Reader(), **kwargs))
    return __version__


def olive_workflow(src: str, out: str | Path, passes: dict, data_configs: list | None = None) -> None:
    """Run an Olive workflow of ``passes`` on the model at ``src`` in a temporary folder (its cache
    there too) and copy the model it writes to ``out``, with the external data files beside it."""
    import shutil
    import tempfile

    from olive.workflows import run as olive_run

    with tempfile.TemporaryDirectory(prefix="olive-") as tmp:
        olive_run({"input_model": {"type": "ONNXModel", "model_path": src}, "data_configs": data_configs or [],
                   "passes": passes, "output_dir": tmp, "cache_dir": str(Path(tmp) / "cache"),
                   "log_severity_level": 3, "evaluate_input_model": False})
        found = sorted(p for p in Path(tmp).rglob("*.onnx") if "cache" not in p.relative_to(tmp).parts)
        if not found:
            raise RuntimeError(f"Olive wrote no model under {tmp}")
        shutil.copyfile(found[0], out)
        for extra in found[0].parent.iterdir():  # its external data keeps the name the model refers to
            if extra.is_file() and extra.suffix != ".onnx":
                shutil.copyfile(extra, Path(out).parent / extra.name)


def olive_quantize(job: dict) -> str:
    """Olive's ``OnnxStaticQuantization`` pass (its defaults: QDQ, int8 activations and weights,
    per-tensor, MinMax, ORT's pre-processing) run as an Olive workflow on the calibration feeds."""
    import olive
    from olive.data.registry import Registry

    data = feeds(job["calib_dir"])

    @Registry.register_dataset("onnxshrink_calib_feeds")
    def _dataset(**_):
        return [(feed, 0) for feed in data]

    olive_workflow(job["src"], job["out"], {"quantize": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
                   [{"name": "calib", "load_dataset_config": {"type": "onnxshrink_calib_feeds"},
                     "dataloader_config": {"type": "no_auto_batch_dataloader"}}])
    return olive.__version__


TOOLS = {"nncf": nncf_quantize, "inc": inc_quantize, "olive": olive_quantize}


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    job = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    version = TOOLS[job["tool"]](job)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_mib": peak_rss_mib(), "version": version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
