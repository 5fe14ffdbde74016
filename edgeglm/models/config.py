"""Model configurations as data: frozen, validated, JSON-serialisable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar

from edgeglm.errors import ConfigError

__all__ = ["GraphMode", "MLPConfig", "ModelConfig", "STGNNConfig", "model_config_from_dict"]

SCHEMA_VERSION = 1


class GraphMode(str, Enum):
    """How an STGNN mixes information across sensors."""

    FIXED = "fixed"  # the given sensor graph's normalized adjacency, a constant
    ADAPTIVE = "adaptive"  # learned from node embeddings, folded to a constant at export
    BOTH = "both"  # fixed and adaptive supports, summed
    NONE = "none"  # identity: no message passing (per-sensor baseline)


@dataclass(frozen=True)
class ModelConfig:
    """Common fields of every reference model.

    Args:
        num_nodes: sensors (graph nodes) per window.
        window: time steps per window.
        rul_cap: the model outputs ``rul_cap · f(x)``, RUL in cycles (default: 125).
    """

    kind: ClassVar[str] = "base"
    num_nodes: int
    window: int
    rul_cap: float = 125.0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"{self.kind}: num_nodes must be ≥ 1, got {self.num_nodes}")
        if self.window < 1:
            raise ConfigError(f"{self.kind}: window must be ≥ 1, got {self.window}")
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"{self.kind}: model config schema_version {self.schema_version}, this EdgeGLM reads {SCHEMA_VERSION}",
                hint="retrain the checkpoint with this EdgeGLM or install the version that wrote it",
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in d.items()}


@dataclass(frozen=True)
class STGNNConfig(ModelConfig):
    """Spatio-temporal GNN: gated dilated temporal convolutions + graph convolutions.

    Args:
        channels: hidden channels per node (default: 32).
        blocks: spatio-temporal blocks; block ``b`` uses dilation ``2^b`` (default: 3).
        kernel_size: temporal kernel (default: 3). The receptive field
            ``1 + (kernel_size − 1)(2^blocks − 1)`` must not exceed ``window``.
        graph: how sensors exchange information (default: fixed).
        embed_dim: node embedding size of the adaptive adjacency (default: 8).
        head_hidden: hidden units of the regression head (default: 64).
        dropout: dropout before the head (default: 0.1).
        temporal_channels: gated temporal-conv output channels per block, one entry per block;
            empty means ``channels`` everywhere (default: empty). Structured pruning narrows
            them, each block by its own amount.
        readout_channels: output channels of the temporal read-out; None means ``channels``
            (default: None). Also set by structured pruning.
    """

    kind: ClassVar[str] = "stgnn"
    channels: int = 32
    blocks: int = 3
    kernel_size: int = 3
    graph: GraphMode = GraphMode.FIXED
    embed_dim: int = 8
    head_hidden: int = 64
    dropout: float = 0.1
    temporal_channels: tuple[int, ...] = ()
    readout_channels: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "graph", _graph_mode(self.graph))
        for name in ("channels", "blocks", "kernel_size", "embed_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stgnn: {name} must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"stgnn: dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "temporal_channels", tuple(int(c) for c in self.temporal_channels))
        if self.temporal_channels and (len(self.temporal_channels) != self.blocks or min(self.temporal_channels) < 1):
            raise ConfigError(
                f"stgnn: temporal_channels {list(self.temporal_channels)} must hold {self.blocks} widths ≥ 1 "
                "(one per block)",
                hint="leave it empty for `channels` in every block",
            )
        if self.readout_channels is not None and self.readout_channels < 1:
            raise ConfigError(f"stgnn: readout_channels must be ≥ 1, got {self.readout_channels}")
        if self.receptive_field > self.window:
            raise ConfigError(
                f"stgnn: receptive field {self.receptive_field} (kernel_size={self.kernel_size}, "
                f"blocks={self.blocks}) exceeds window={self.window}",
                hint="use fewer blocks, a smaller kernel, or a longer window",
            )

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * (2**self.blocks - 1)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`ModelConfig.to_dict`; the pruning widths only when set, so the model.json of an
        unpruned STGNN stays what EdgeGLM versions before them read."""
        d = super().to_dict()
        if not self.temporal_channels:
            del d["temporal_channels"]
        if self.readout_channels is None:
            del d["readout_channels"]
        return d

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Gated temporal-conv output channels of each block."""
        return self.temporal_channels or (self.channels,) * self.blocks

    @property
    def readout_width(self) -> int:
        """Output channels of the temporal read-out."""
        return self.channels if self.readout_channels is None else self.readout_channels


@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    """Graph-free MLP student (GLNN-style: Zhang et al., ICLR 2022, https://arxiv.org/abs/2110.08727).

    Args:
        hidden: widths of the hidden layers (default: (128, 64)).
        dropout: dropout between layers (default: 0.1).
        temporal: 0 (default) flattens the window; ``k > 0`` first maps each sensor's series of
            ``window`` readings to ``k`` learned temporal features with one linear map shared
            by all sensors, so the first hidden layer sees ``nodes·k`` inputs instead of
            ``nodes·window`` (on FD001, 14·30 = 420 → 14·k): most of a flat MLP's weights
            sit in that first layer.
    """

    kind: ClassVar[str] = "mlp"
    hidden: tuple[int, ...] = field(default=(128, 64))
    dropout: float = 0.1
    temporal: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"mlp: hidden must be a non-empty list of widths ≥ 1, got {list(self.hidden)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"mlp: dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.temporal <= self.window:
            raise ConfigError(f"mlp: temporal must be in 0..window ({self.window}), got {self.temporal}")


_CONFIGS: dict[str, type[ModelConfig]] = {c.kind: c for c in (STGNNConfig, MLPConfig)}


def _graph_mode(value: Any) -> GraphMode:
    try:
        return GraphMode(value)
    except ValueError:
        valid = ", ".join(m.value for m in GraphMode)
        raise ConfigError(f"stgnn: graph={value!r} is not a graph mode; valid: {valid}") from None


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from :meth:`ModelConfig.to_dict` output; unknown kinds or keys are errors."""
    d = dict(d)
    kind = d.pop("kind", None)
    cls = _CONFIGS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(_CONFIGS))}")
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{kind}: unknown model config keys {unknown}; valid keys: {sorted(fields)}")
    for key in ("hidden", "temporal_channels"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)
