"""Typed errors. Every error names what failed and how to fix it; the CLI maps them to exit codes."""

from __future__ import annotations


class ShrinkError(Exception):
    """Base class of every error onnxshrink raises on purpose.

    ``exit_code`` is what the CLI returns: 2 for usage and input errors (the gate reserves 1 for a
    failed budget), 3 for an internal failure of a pass or check.
    """

    exit_code = 2


class ModelLoadError(ShrinkError):
    """The input is not a readable ONNX model (not protobuf, truncated, external data missing)."""


class UnsupportedModelError(ShrinkError):
    """The model is readable but outside what onnxshrink supports (IR version, opset)."""


class OutputError(ShrinkError):
    """The output cannot be written (path not writable, would overwrite the input)."""


class ConfigError(ShrinkError):
    """A preset, recipe, pass config or gate config is invalid."""


class DataError(ShrinkError):
    """Input data (validation or calibration feeds) does not match the model."""


class PassFailure(ShrinkError):
    """A pass raised while rewriting. Names the pass."""

    exit_code = 3


class CheckFailure(ShrinkError):
    """A structural check (sort order, onnx checker, shape inference) failed after a pass."""

    exit_code = 3


class DriftFailure(ShrinkError):
    """A pass changed the model's outputs beyond its tolerance (``--check-each``)."""

    exit_code = 3


class RuntimeFailure(ShrinkError):
    """ONNX Runtime could not create a session or run the model."""

    exit_code = 3
