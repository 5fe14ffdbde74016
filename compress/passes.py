"""The pass contract: one verb, one frozen config per technique, handlers found by config type.

A recipe is a list of pass configs. Each pass takes the current :class:`Stage` (a torch
module before export, an ONNX file after) and returns a :class:`PassResult`: the new
stage plus a record for the report. Passes never modify their input stage; the runner
measures accuracy, size and latency after every pass, so a pass only records what is
specific to it (channels removed, nodes kept in float, op counts…).

Adding a technique::

    @dataclass(frozen=True)
    class MyConfig(PassConfig):
        kind: ClassVar[str] = "mine"        # also its table name in the recipe TOML
        strength: float = 0.5
        def __post_init__(self): ...         # validate, raise ConfigError naming the field

    @register_pass(MyConfig)
    def _run_mine(stage: Stage, config: MyConfig, ctx: PassContext) -> PassResult: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgeglm.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from edgeglm.training import Prepared

__all__ = [
    "PassConfig",
    "PassContext",
    "PassResult",
    "Stage",
    "config_from_table",
    "known_kinds",
    "register_pass",
    "run_pass",
]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses set ``kind`` and validate in ``__post_init__``."""

    kind: ClassVar[str] = "base"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"[{self.kind}] schema_version {self.schema_version}; this EdgeGLM reads {SCHEMA_VERSION}"
            )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = getattr(v, "value", v)
        return out


@dataclass(frozen=True)
class Stage:
    """The model between passes.

    Args:
        name: short label for the report (``"teacher"``, ``"pruned"``, ``"int8"``…).
        torch_model: the module, before export (eval mode).
        onnx_path: the ONNX file, after export.
        architecture: what the model is, e.g. ``"stgnn"`` or ``"mlp"`` (for the report).
    """

    name: str
    torch_model: nn.Module | None = None
    onnx_path: Path | None = None
    architecture: str = ""

    def __post_init__(self) -> None:
        if (self.torch_model is None) == (self.onnx_path is None):
            raise ValueError("a Stage holds exactly one of torch_model or onnx_path")

    @property
    def is_onnx(self) -> bool:
        return self.onnx_path is not None


@dataclass
class PassContext:
    """What every pass may read.

    Args:
        prepared: windows of the data set (``train``/``val``/``test``), window spec and graph.
            Calibration and fine-tuning use ``train``; budgets use ``val``; never ``test``.
        teacher: the original FP32 model from the checkpoint (distillation's teacher).
        workdir: a folder the pass may write files into (its outputs go there).
        seed: seed for anything random.
        progress: show progress bars.
        threads: torch / ONNX Runtime threads (None: all cores).
    """

    prepared: Prepared
    teacher: nn.Module
    workdir: Path
    seed: int = 0
    progress: bool = True
    threads: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    """A pass's output: the new stage and a JSON-serialisable record for the report."""

    stage: Stage
    record: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Stage, Any, PassContext], PassResult]
_REGISTRY: dict[type[PassConfig], Handler] = {}
_BY_KIND: dict[str, type[PassConfig]] = {}


def register_pass(config_cls: type[PassConfig]) -> Callable[[Handler], Handler]:
    """Register ``handler`` as the implementation of ``config_cls`` (one handler per config type)."""

    def deco(handler: Handler) -> Handler:
        if config_cls.kind in _BY_KIND and _BY_KIND[config_cls.kind] is not config_cls:
            raise ValueError(f"pass kind {config_cls.kind!r} registered twice")
        _REGISTRY[config_cls] = handler
        _BY_KIND[config_cls.kind] = config_cls
        return handler

    return deco


def _load_builtin_passes() -> None:
    # Importing a pass module registers it. Kept lazy so `import edgeglm.compress.passes` is cheap.
    import importlib

    for name in ("prune", "distill", "export", "fuse", "quantize"):
        try:
            importlib.import_module(f"edgeglm.compress.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgeglm.compress.{name}":
                raise


def known_kinds() -> list[str]:
    """Kinds a recipe may name, sorted."""
    _load_builtin_passes()
    return sorted(_BY_KIND)


def config_from_table(kind: str, table: dict[str, Any]) -> PassConfig:
    """Build the config of pass ``kind`` from a TOML table; unknown kinds or keys are errors."""
    _load_builtin_passes()
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ConfigError(f"unknown pass {kind!r}; known passes: {', '.join(known_kinds())}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - valid - {"kind"})
    if unknown:
        raise ConfigError(f"[{kind}] unknown field(s) {unknown}; valid fields: {sorted(valid)}")
    try:
        return cls(**{k: v for k, v in table.items() if k != "kind"})
    except TypeError as exc:
        raise ConfigError(f"[{kind}] {exc}") from exc


def run_pass(stage: Stage, config: PassConfig, ctx: PassContext) -> PassResult:
    """Run the pass registered for ``type(config)`` on ``stage``."""
    _load_builtin_passes()
    handler = _REGISTRY.get(type(config))
    if handler is None:
        raise ConfigError(f"no pass registered for {type(config).__name__}; known passes: {known_kinds()}")
    return handler(stage, config, ctx)
