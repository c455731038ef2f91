"""Latency of one model, or of a reference and a candidate measured together, on ONNX Runtime.

``measure(models, data, providers=...)`` opens a session per model and provider, warms each up, then
times ``runs`` rounds. With two models both sessions stay alive and the runs interleave (A B, B A,
A B, ...: the order flips every round), so a load change on a shared machine hits both alike; the
speed-up is the ratio of medians with a paired bootstrap 95% interval, and the per-round ratios'
10th/50th/90th percentiles show the spread.

Providers: ``cpu`` runs ``session.run`` on host arrays. ``cuda`` and ``tensorrt`` bind device-resident
inputs and outputs through I/O binding (``OrtValue.ortvalue_from_numpy(x, "cuda", 0)``), so the timing
holds no host-device copies. A provider ONNX Runtime does not offer is reported as skipped with the
reason, never silently replaced by the CPU.

Threads: 1 intra-op thread by default. On small shared machines the latency with 2 threads jumps
between two levels, which makes ratios noisy; ``threads=0`` leaves ONNX Runtime's default.

Memory: for CPU, the peak resident-set growth of this process while the session is created and warmed
up (``/proc/self/clear_refs`` resets the peak; where that is impossible the current RSS growth is
given, and said so). For GPU providers, the device-wide used-memory growth read through NVML
(``pynvml``) or ``nvidia-smi`` when either is present, else unknown.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from onnxshrink import data as data_mod
from onnxshrink import model_io, runtime
from onnxshrink.errors import DataError, RuntimeFailure

logger = logging.getLogger(__name__)

THREADS_NOTE = (
    "1 intra-op thread by default: with 2 threads the latency on small shared machines jumps between "
    "two levels; use --threads to change it"
)
PROVIDER_CHAINS = {
    "CPUExecutionProvider": ["CPUExecutionProvider"],
    "CUDAExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "TensorrtExecutionProvider": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
SHORT_NAMES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


@dataclasses.dataclass
class LatencyStats:
    """Latency statistics of one model in milliseconds; throughput in samples per second."""

    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    throughput: float
    batch: int

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], batch: int) -> LatencyStats:
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        med = float(np.median(ms))
        return cls(
            runs=len(ms), median_ms=med, p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)), min_ms=float(ms.min()), mean_ms=float(ms.mean()),
            std_ms=float(ms.std()), throughput=batch * 1000.0 / med if med > 0 else float("inf"), batch=batch,
        )


@dataclasses.dataclass
class ModelBench:
    label: str
    source: str
    latency: LatencyStats
    session_seconds: float
    memory_bytes: int | None
    memory_kind: str


@dataclasses.dataclass
class Ratio:
    """Candidate against reference: ``speedup = median(ref) / median(cand)`` with its spread."""

    speedup: float
    ci_low: float
    ci_high: float
    pair_p10: float
    pair_p50: float
    pair_p90: float
    pairs: int

    @property
    def latency_ratio(self) -> float:
        return 1.0 / self.speedup if self.speedup else float("inf")


@dataclasses.dataclass
class ProviderBench:
    provider: str
    threads: dict
    io_binding: bool
    models: list[ModelBench] = dataclasses.field(default_factory=list)
    ratio: Ratio | None = None
    skipped: str | None = None


@dataclasses.dataclass
class BenchReport:
    providers: dict[str, ProviderBench]
    warmup: int
    runs: int
    feed: dict

    def measured(self) -> list[ProviderBench]:
        return [p for p in self.providers.values() if not p.skipped]

    def to_dict(self) -> dict:
        out = {"warmup": self.warmup, "runs": self.runs, "feed": self.feed, "providers": {}}
        for short, p in self.providers.items():
            d = dataclasses.asdict(p)
            if p.ratio:
                d["ratio"]["latency_ratio"] = p.ratio.latency_ratio
            out["providers"][short] = d
        return out

    def table_rows(self) -> list[list]:
        rows = []
        for short, p in self.providers.items():
            if p.skipped:
                rows.append([short, "(skipped)", None, None, None, None, None, None, None, None])
                continue
            for m in p.models:
                lat = m.latency
                rows.append([short, m.label, lat.median_ms, lat.p90_ms, lat.p99_ms, lat.min_ms, lat.mean_ms,
                             lat.throughput, m.session_seconds, _mib(m.memory_bytes)])
        return rows

    TABLE_HEADERS = ("provider", "model", "median ms", "p90 ms", "p99 ms", "min ms", "mean ms", "samples/s",
                     "session s", "mem MiB")


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def measure(
    models: Sequence,
    data=None,
    *,
    providers=("cpu",),
    threads: int = 1,
    warmup: int = 10,
    runs: int = 100,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    bootstrap: int = 1000,
    extras: Sequence[str] = ("labels",),
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchReport:
    """Time one or two models (paths, bytes or ``ir.Model``) on each provider; see the module doc.

    The first feed of ``data`` (anything ``onnxshrink.data.feeds`` takes; None: random) drives every
    run; arrays named in ``extras`` (labels kept with validation data) are left out.
    ``progress(provider, done, total)`` is called during the timed rounds.
    """
    if not 1 <= len(models) <= 2:
        raise DataError(f"bench takes one or two models, got {len(models)}")
    if runs < 1 or warmup < 0:
        raise DataError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    labels = list(labels or (["reference", "candidate"] if len(models) == 2 else ["model"]))
    irs = [model_io.load(m) for m in models]
    specs = data_mod.input_specs(irs[0])
    if len(irs) == 2 and {s.name for s in data_mod.input_specs(irs[1])} != {s.name for s in specs}:
        raise DataError("the two models take different inputs; they cannot run on the same feed")
    feed = next(iter(data_mod.feeds(data, specs, dims=dims, count=1, seed=seed, extras=extras)))
    batch = _batch_of(feed)
    report = BenchReport({}, warmup, runs, {k: list(v.shape) for k, v in feed.items()})
    for provider in runtime.resolve_providers(providers):
        short = SHORT_NAMES.get(provider, provider)
        report.providers[short] = _measure_provider(
            provider, models, irs, labels, feed, batch, threads, warmup, runs, bootstrap, progress)
    return report


def _measure_provider(provider, models, irs, labels, feed, batch, threads, warmup, runs, bootstrap, progress):
    thread_info = {
        "intra_op_num_threads": threads or "onnxruntime default",
        "inter_op_num_threads": 1 if threads else "onnxruntime default",
        "note": THREADS_NOTE if threads == 1 else "",
    }
    device = provider != "CPUExecutionProvider"
    result = ProviderBench(SHORT_NAMES.get(provider, provider), thread_info, io_binding=device)
    if provider not in runtime.available_providers():
        result.skipped = f"{provider} is not available in this onnxruntime ({runtime.available_providers()})"
        logger.warning("bench: %s", result.skipped)
        return result
    chain = PROVIDER_CHAINS.get(provider, [provider, "CPUExecutionProvider"])
    runners, created = [], []
    for src, model in zip(models, irs):
        probe = _MemoryProbe(device)
        t0 = time.perf_counter()
        sess = runtime.make_session(_session_target(src, model), chain, threads=threads or None)
        session_s = time.perf_counter() - t0
        if sess.get_providers()[0] != provider:
            result.skipped = f"onnxruntime fell back to {sess.get_providers()} instead of {provider}"
            return result
        run = _device_runner(sess, feed) if device else _host_runner(sess, feed)
        for _ in range(warmup):
            run()
        mem, kind = probe.stop()
        runners.append(run)
        created.append((session_s, mem, kind, sess))
    times = _interleaved(runners, runs, lambda done: progress and progress(result.provider, done, runs))
    for label, src, ts, (session_s, mem, kind, _) in zip(labels, models, times, created):
        result.models.append(ModelBench(label, _describe(src), LatencyStats.from_seconds(ts, batch),
                                        session_s, mem, kind))
    if len(times) == 2:
        result.ratio = paired_ratio(times[0], times[1], bootstrap=bootstrap)
    return result


def _interleaved(runners, runs: int, tick) -> list[list[float]]:
    """Time ``runs`` rounds; each round runs every model once, the order flipping every round."""
    times = [[] for _ in runners]
    order = list(range(len(runners)))
    step = max(1, runs // 20)
    clock = time.perf_counter
    for i in range(runs):
        for j in (order if i % 2 == 0 else order[::-1]):
            t = clock()
            runners[j]()
            times[j].append(clock() - t)
        if (i + 1) % step == 0 or i + 1 == runs:
            tick(i + 1)
    return times


def paired_ratio(ref_s: Sequence[float], cand_s: Sequence[float], *, bootstrap: int = 1000,
                 seed: int = 0) -> Ratio:
    """Speed-up ``median(ref) / median(cand)`` of paired timings, with a bootstrap 95% interval over
    rounds and the 10/50/90th percentiles of the per-round ratios ``ref_i / cand_i``."""
    ref = np.asarray(ref_s, dtype=np.float64)
    cand = np.asarray(cand_s, dtype=np.float64)
    if ref.shape != cand.shape or ref.size == 0:
        raise DataError("paired_ratio needs two equally long, non-empty timing lists")
    speedup = float(np.median(ref) / np.median(cand))
    lo = hi = speedup
    if bootstrap and ref.size > 1:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, ref.size, size=(bootstrap, ref.size))
        boot = np.median(ref[idx], axis=1) / np.median(cand[idx], axis=1)
        lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    pair = ref / cand
    p10, p50, p90 = (float(x) for x in np.percentile(pair, [10, 50, 90]))
    return Ratio(speedup, lo, hi, p10, p50, p90, int(ref.size))


def _host_runner(sess, feed):
    names = [o.name for o in sess.get_outputs()]

    def run():
        sess.run(names, feed)

    return run


def _device_runner(sess, feed):
    """Inputs copied to the GPU once; outputs left on the GPU; ``run_with_iobinding`` per call."""
    rt = runtime.ort()
    io = sess.io_binding()
    held = []
    try:
        for name, array in feed.items():
            value = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
            held.append(value)
            io.bind_ortvalue_input(name, value)
        for out in sess.get_outputs():
            io.bind_output(out.name, "cuda", 0)
    except Exception as e:  # ORT raises its own exception types
        raise RuntimeFailure(f"could not bind inputs on the GPU: {e}") from e

    def run():
        sess.run_with_iobinding(io)

    run.held = held  # keep the device buffers alive as long as the runner
    return run


def _batch_of(feed: dict) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "<bytes>" if isinstance(src, (bytes, bytearray)) else "<in-memory model>"


def _session_target(src, model):
    """Paths and bytes go to ONNX Runtime as they are (weights never pass through Python)."""
    return src if isinstance(src, (str, os.PathLike, bytes)) else model


class _MemoryProbe:
    """Memory growth from construction to ``stop()``: CPU peak RSS, or device-wide GPU memory."""

    def __init__(self, device: bool) -> None:
        self.device = device
        if device:
            self.start = _gpu_used_bytes()
        else:
            self.peak_resettable = _reset_peak_rss()
            self.start = _proc_status_bytes("VmRSS")

    def stop(self) -> tuple[int | None, str]:
        if self.device:
            now = _gpu_used_bytes()
            if self.start is None or now is None:
                return None, "unknown (no NVML or nvidia-smi)"
            return now - self.start, "GPU memory growth, whole device"
        if self.start is None:
            return None, "unknown (no /proc)"
        if self.peak_resettable:
            peak = _proc_status_bytes("VmHWM")
            return (peak - self.start if peak is not None else None), "peak RSS growth"
        now = _proc_status_bytes("VmRSS")
        return (now - self.start if now is not None else None), "RSS growth (peak not resettable)"


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _gpu_used_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception as e:  # noqa: BLE001 - NVML absent or unusable: try nvidia-smi
        logger.debug("NVML unavailable: %s", e)
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.strip().splitlines()[0]) * 2**20)
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None
