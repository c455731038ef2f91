"""Pass infrastructure on top of ``onnx_ir.passes``.

A pass subclasses :class:`ShrinkPass` (an ``onnx_ir.passes.InPlacePass``), declares a ``name``, a frozen
dataclass ``Config`` and what it may change (:class:`Changes`), and implements ``apply(model, stats)``.
It counts what it did in ``stats`` (``stats.add("nodes_removed")``) and reports every node it refused to
touch with ``stats.skip(node, reason)``. The model counts as modified exactly when something was counted.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
from collections import Counter
from typing import Any, ClassVar

import onnx_ir as ir

from onnxshrink.errors import ConfigError

logger = logging.getLogger(__name__)


class Changes(enum.Flag):
    """What a pass may change. The pipeline uses it to decide which checks to run."""

    NONE = 0
    TOPOLOGY = enum.auto()  # nodes added, removed or rewired
    WEIGHTS = enum.auto()  # initializer values
    SHAPES = enum.auto()  # intermediate shapes (never graph inputs/outputs)
    DTYPES = enum.auto()  # intermediate dtypes
    NUMERICS = enum.auto()  # outputs may differ by more than float rounding (lossy)


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """Config of a pass that takes no options."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """A node a pass declined to rewrite, and why."""

    pass_name: str
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.pass_name}: skipped {self.op_type} node {self.node!r}: {self.reason}"


@dataclasses.dataclass
class PassStats:
    """Counted effects of one pass run, plus the nodes it skipped."""

    pass_name: str
    counts: Counter = dataclasses.field(default_factory=Counter)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] += n

    def skip(self, node: ir.Node, reason: str) -> None:
        item = Skip(self.pass_name, node.name or "<unnamed>", node.op_type, reason)
        self.skipped.append(item)
        logger.info("%s", item)

    @property
    def changed(self) -> bool:
        return any(v for v in self.counts.values())

    def merge(self, other: PassStats) -> None:
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)

    def to_dict(self) -> dict:
        return {
            "pass": self.pass_name,
            "counts": dict(self.counts),
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            **({"notes": self.notes} if self.notes else {}),
        }


@dataclasses.dataclass
class ShrinkResult(ir.passes.PassResult):
    stats: PassStats = None  # type: ignore[assignment]


class ShrinkPass(ir.passes.InPlacePass):
    """Base of every onnxshrink pass. Subclasses set the class attributes and implement ``apply``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    changes: ClassVar[Changes] = Changes.TOPOLOGY
    #: Drift budget for ``--check-each``: lossless passes must match within float rounding.
    lossy: ClassVar[bool] = False

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__()
        if config is not None and options:
            raise ConfigError(f"pass {self.name!r}: give either a config object or options, not both")
        if config is None:
            _check_option_types(self.name, self.Config, options)
            try:
                config = self.Config(**options)
            except TypeError as e:
                fields = [f.name for f in dataclasses.fields(self.Config)]
                raise ConfigError(
                    f"pass {self.name!r}: bad options {sorted(options)}; it takes {fields}"
                ) from e
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"pass {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def call(self, model: ir.Model) -> ShrinkResult:
        stats = PassStats(self.name)
        self.apply(model, stats)
        return ShrinkResult(model, stats.changed, stats)

    @abc.abstractmethod
    def apply(self, model: ir.Model, stats: PassStats) -> None:
        """Rewrite ``model`` in place, counting changes in ``stats``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _check_option_types(name: str, config_cls, options: dict) -> None:
    """A string given where the config wants a collection (``keep_ops = "Conv"`` in a recipe) would be
    read letter by letter; numbers where it wants a number of another kind are refused too."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in options.items():
        f = fields.get(key)
        if f is None:
            continue
        kind = str(f.type)
        collection = kind.startswith(("tuple", "list", "frozenset", "set", "Sequence"))
        if collection and isinstance(value, (str, bytes)):
            raise ConfigError(f"pass {name!r}: option {key!r} takes a list (e.g. [{value!r}]), not a string")
        if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"pass {name!r}: option {key!r} takes a number, not {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"pass {name!r}: option {key!r} takes true or false, not {value!r}")


def iter_graphs(model: ir.Model):
    """The main graph, every subgraph (If/Loop/Scan bodies) and every function body.

    Functions are yielded as ``ir.Function`` objects, which support the same node editing API.
    """
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        for node in function.all_nodes():
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield from _subgraphs_of(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        yield from _subgraphs_of(g)


def _subgraphs_of(graph: ir.Graph):
    yield graph
    yield from graph.subgraphs()
