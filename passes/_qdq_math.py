"""Quantization arithmetic for the QDQ pass: scales, zero points, weight and bias quantization.

Pure numpy, no graph. Conventions (those of ONNX ``QuantizeLinear``: ``q = sat(rint(x / s) + zp)``):

- Activations, ``uint8``: asymmetric, ``[0, 255]``; the range is widened to contain 0 so that 0 is exact.
- Activations, ``int8``: symmetric, ``[-127, 127]``, zero point 0; a range whose minimum is >= 0 (a folded
  Relu, a Sigmoid output) is asymmetric ``[-128, 127]`` instead, so the Relu is still exact and no code
  is wasted on negatives.
- Weights: symmetric int8 ``[-127, 127]``, zero point 0, one scale per output channel or one per
  tensor. Narrowed (``reduce_range``, for CPUs whose int8 GEMM saturates): pair-safe where the GEMM's K
  order is known (``kernel_rows``, ``pair_safe_scale``), else 7 bits (``[-64, 64]``).
- Bias: int32, scale = input scale x weight scale (per channel), zero point 0.

Every scale returned is a finite float32 > 0: a zero range (a tensor that is always 0) gets scale 1.0,
a range narrower than ``MIN_SCALE`` per step is widened.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Smallest scale ever produced (a positive float32 far above the denormals).
MIN_SCALE = 1e-12
INT32_LIMIT = 2**31 - 1
#: Bias values are kept within this fraction of the int32 range (headroom for the kernel's accumulator).
BIAS_HEADROOM = 0.5

QTYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor (per tensor, or per channel along ``axis``)."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # uint8 / int8 / int32, same shape as scale
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    def check(self, what: str) -> None:
        """Raise ``ValueError`` unless every scale is finite and > 0."""
        s = np.asarray(self.scale)
        if s.dtype != np.float32 or not np.all(np.isfinite(s)) or not np.all(s > 0):
            raise ValueError(f"{what}: invalid scale {s!r} (every scale must be a finite float32 > 0)")


def activation_params(rmin: float, rmax: float, qtype: str) -> QParams:
    """Per-tensor parameters for an activation observed in ``[rmin, rmax]`` (see module conventions)."""
    if not (np.isfinite(rmin) and np.isfinite(rmax)) or rmin > rmax:
        raise ValueError(f"bad activation range [{rmin}, {rmax}]")
    np_type, qmin, qmax = QTYPES[qtype]
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if qtype == "int8" and rmin < 0:
        qmin = -127  # symmetric: [-a, a] onto [-127, 127], zero point 0
        a = max(-rmin, rmax)
        rmin, rmax = -a, a
    if rmax == rmin:
        return QParams(np.array(1.0, np.float32), np.array(qmin if qtype == "uint8" else 0, np_type))
    scale = np.float32(max((rmax - rmin) / (qmax - qmin), MIN_SCALE))
    zp = int(np.clip(np.rint(qmin - rmin / float(scale)), qmin, qmax))
    return QParams(np.array(scale, np.float32), np.array(zp, np_type))


def weight_params(w: np.ndarray, axis: int | None, reduce_range: bool = False,
                  rows: np.ndarray | None = None) -> QParams:
    """Symmetric int8 parameters of a constant weight, per channel along ``axis`` or per tensor. With
    ``reduce_range`` and ``rows`` (``kernel_rows``: the weight as the int8 GEMM reads it), pair-safe
    scales (``pair_safe_scale``); with ``reduce_range`` alone, 7 bits."""
    if reduce_range and rows is not None:
        scale = pair_safe_scale(rows, 1, 1 if axis is not None else (0, 1))
    elif not np.asarray(w).size:
        scale = np.ones(() if axis is None else np.asarray(w).shape[axis], np.float32)
    else:
        axes = None if axis is None else tuple(i for i in range(np.ndim(w)) if i != axis)
        scale = symmetric_scale(w, 0, axes, "7bit" if reduce_range else None)
    return QParams(scale, np.zeros(scale.shape, np.int8), axis)


#: Largest sum of two neighbouring int8 weight magnitudes that ONNX Runtime's u8 x s8 GEMM on CPUs
#: without VNNI (``vpmaddubsw``: two u8 x s8 products added into int16) takes without clipping for any
#: uint8 input: 255 x 128 = 32640 <= 32767.
PAIR_LIMIT = 128


def kernel_rows(w: np.ndarray, op_type: str, axis: int | None, trans_b: bool = False) -> np.ndarray | None:
    """``w`` as [output channels, K] with K in the order ONNX Runtime's x86 int8 GEMM pairs it, or None
    where that order is not known (ConvTranspose, weights of more than 2 dims for MatMul/Gemm). Conv:
    kernel row, column, then input channel (an NHWC im2col: with 3 input channels, neighbours cross
    taps); MatMul/Gemm: K. ``tests/test_qdq_pair_safe.py`` asks ONNX Runtime that these are the pairs."""
    w = np.asarray(w, np.float32)
    if op_type == "Conv" and w.ndim >= 3 and axis in (0, None):
        return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
    if op_type in ("MatMul", "Gemm") and w.ndim == 2:
        k_first = not (op_type == "Gemm" and trans_b)
        if axis is None or axis == (1 if k_first else 0):
            return w.T if k_first else w
    return None


def neighbour_sums(w: np.ndarray, axis: int) -> np.ndarray:
    """``|w_k| + |w_k+1|`` along ``axis`` (one element fewer there; empty for a single element), in
    float64 so that int8 codes do not wrap."""
    a = np.abs(np.asarray(w, np.float64))
    n = a.shape[axis]
    return np.take(a, range(n - 1), axis=axis) + np.take(a, range(1, n), axis=axis)


def _scale(top: np.ndarray, qmax: int) -> np.ndarray:
    """Scales mapping magnitude ``top`` to ``qmax`` (float64 division, float32 result; a zero range: 1)."""
    top = np.asarray(top, np.float64)
    return np.where(top > 0, np.maximum(top / qmax, MIN_SCALE), 1.0).astype(np.float32)


def pair_safe_scale(w: np.ndarray, k_axis: int, reduce_axes) -> np.ndarray:
    """Symmetric int8 scales of ``w`` (reduced over ``reduce_axes``, which include ``k_axis``, the
    GEMM's reduction axis) under which no two neighbours along ``k_axis`` round to magnitudes summing
    past ``PAIR_LIMIT``: ``max(|w|, |w_k| + |w_k+1|) / 127``. Rounding adds at most 1 to a pair's
    127, so the GEMM never clips. A row whose large weights sit apart keeps up to 8 bits; the step is
    at most ``2 max|w| / 127`` (two largest weights side by side), within 1% of 7 bits' ``max|w| / 64``.
    A 2-D weight is read in blocks of ``BLOCK_BYTES`` (``_pair_top_2d``), the same values."""
    w = np.asarray(w)
    axes = tuple(sorted({reduce_axes} if isinstance(reduce_axes, int) else set(reduce_axes)))
    if w.ndim == 2 and w.size and axes in ((k_axis,), (0, 1)):
        top = _pair_top_2d(w, k_axis)
        return _scale(top if axes == (k_axis,) else top.max(), 127)
    top = abs_max(w, reduce_axes)
    if np.shape(w)[k_axis] > 1:
        top = np.maximum(top, neighbour_sums(w, k_axis).max(axis=reduce_axes))
    return _scale(top, 127)


#: Float64 bytes of a block of ``_pair_top_2d``: a 4096 x 12288 weight read whole made five float64
#: copies of it (2 GB) and took 6 s, mostly in memory traffic; in blocks, 0.2 s (one-off measurement).
BLOCK_BYTES = 8 << 20


def _pair_top_2d(w: np.ndarray, k_axis: int) -> np.ndarray:
    """``max(|w|, |w_k| + |w_k+1|)`` over ``k_axis`` of a 2-D ``w``, per slice along the other axis, read
    in blocks of slices (float64: the sums of two float32 magnitudes are the whole-array ones)."""
    k = w.shape[k_axis]
    n = w.shape[1 - k_axis]
    step = max(1, BLOCK_BYTES // (8 * k))
    top = np.empty(n, np.float64)
    for i in range(0, n, step):
        block = w[i:i + step] if k_axis == 1 else w[:, i:i + step].T
        a = np.abs(np.asarray(block, np.float64))
        part = a.max(axis=1)
        if k > 1:
            np.maximum(part, (a[:, :-1] + a[:, 1:]).max(axis=1), out=part)
        top[i:i + step] = part
    return top


def symmetric_scale(w: np.ndarray, k_axis: int, reduce_axes, narrow: str | None) -> np.ndarray:
    """Symmetric int8 scales of ``w`` reduced over ``reduce_axes``: 8 bits (``narrow`` None), 7 bits
    (``"7bit"``: ``[-64, 64]``) or pair-safe along ``k_axis`` (``"pair_safe"``, ``pair_safe_scale``)."""
    if narrow == "pair_safe":
        return pair_safe_scale(w, k_axis, reduce_axes)
    if narrow not in (None, "7bit"):
        raise ValueError(f"narrow must be None, '7bit' or 'pair_safe', not {narrow!r}")
    return _scale(abs_max(w, reduce_axes), 64 if narrow else 127)


def abs_max(w: np.ndarray, axes) -> np.ndarray:
    """``max |w|`` over ``axes`` as float64, computed in ``w``'s own float type: max and negation round
    nothing, so it equals the float64 computation without its copies (0.15 -> 0.03 s on a 4096 x 12288
    float32 weight, one-off)."""
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float64)
    return np.maximum(w.max(axis=axes), -w.min(axis=axes)).astype(np.float64)


def quantize_weight(w: np.ndarray, params: QParams, reduce_range: bool = False) -> np.ndarray:
    """``w`` as int8 with ``params`` (scales broadcast along ``params.axis``); one float32 temporary,
    rounded and clipped in place."""
    qmax = 64 if reduce_range else 127
    s = _broadcast(params.scale, np.asarray(w).ndim, params.axis)
    q = np.asarray(np.divide(np.asarray(w, np.float32), s, dtype=np.float32))  # a 0-d result is a scalar
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(np.int8)


def bias_scale(x_scale: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Scale of an int32 bias: input scale x weight scale, computed in float32 as the kernels do."""
    return (np.float32(x_scale) * np.asarray(w_scale, np.float32)).astype(np.float32)


def fit_weight_scale_to_bias(
    bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray
) -> np.ndarray:
    """Weight scales, raised where needed so that ``bias / (x_scale * w_scale)`` fits in int32 with headroom.

    A tiny weight channel with a large bias would otherwise overflow the int32 bias; raising that
    channel's weight scale costs weight precision only in that channel. Returns ``w_scale`` unchanged
    when nothing overflows.
    """
    bias = np.asarray(bias, np.float64).reshape(-1)
    need = np.abs(bias) / (float(x_scale) * INT32_LIMIT * BIAS_HEADROOM)
    w = np.asarray(w_scale, np.float64)
    if w.ndim == 0:
        return np.array(max(float(w), float(need.max(initial=0.0))), np.float32)
    return np.maximum(w, need).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``bias`` as int32 with per-channel (or scalar) ``scale``: ``rint(b / s)``, saturated."""
    q = np.rint(np.asarray(bias, np.float64) / np.asarray(scale, np.float64))
    return np.clip(q, -INT32_LIMIT - 1, INT32_LIMIT).astype(np.int32)


def quantize_activation(x: np.ndarray, params: QParams) -> np.ndarray:
    """Reference ``QuantizeLinear`` for a per-tensor activation (used for constant inputs and tests)."""
    info = np.iinfo(params.dtype)
    q = np.rint(np.asarray(x, np.float32) / params.scale) + params.zero_point.astype(np.int64)
    return np.clip(q, info.min, info.max).astype(params.dtype)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    values = np.asarray(values)
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)
