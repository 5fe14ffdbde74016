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
    """

    kind: ClassVar[str] = "stgnn"
    channels: int = 32
    blocks: int = 3
    kernel_size: int = 3
    graph: GraphMode = GraphMode.FIXED
    embed_dim: int = 8
    head_hidden: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "graph", _graph_mode(self.graph))
        for name in ("channels", "blocks", "kernel_size", "embed_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"stgnn: {name} must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"stgnn: dropout must be in [0, 1), got {self.dropout}")
        if self.receptive_field > self.window:
            raise ConfigError(
                f"stgnn: receptive field {self.receptive_field} (kernel_size={self.kernel_size}, "
                f"blocks={self.blocks}) exceeds window={self.window}",
                hint="use fewer blocks, a smaller kernel, or a longer window",
            )

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * (2**self.blocks - 1)


@dataclass(frozen=True)
class MLPConfig(ModelConfig):
    """Graph-free MLP student (GLNN-style: Zhang et al., ICLR 2022, https://arxiv.org/abs/2110.08727).

    Args:
        hidden: widths of the hidden layers (default: (128, 64)).
        dropout: dropout between layers (default: 0.1).
    """

    kind: ClassVar[str] = "mlp"
    hidden: tuple[int, ...] = field(default=(128, 64))
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"mlp: hidden must be a non-empty list of widths ≥ 1, got {list(self.hidden)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"mlp: dropout must be in [0, 1), got {self.dropout}")


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
    if "hidden" in d:
        d["hidden"] = tuple(d["hidden"])
    return cls(**d)
