"""Reference graph models (torch): an STGNN teacher, a smaller GNN student, an MLP student."""

from __future__ import annotations

import numpy as np
from torch import nn

from edgeglm.models.config import GraphMode, MLPConfig, ModelConfig, STGNNConfig, model_config_from_dict
from edgeglm.models.graph_conv import DenseGraphConv
from edgeglm.models.mlp import MLPStudent
from edgeglm.models.stgnn import STGNN, TemporalConv

__all__ = [
    "STGNN",
    "DenseGraphConv",
    "GraphMode",
    "MLPConfig",
    "MLPStudent",
    "ModelConfig",
    "STGNNConfig",
    "TemporalConv",
    "build_model",
    "count_parameters",
    "model_config_from_dict",
]


def build_model(config: ModelConfig, adjacency: np.ndarray | None = None) -> nn.Module:
    """Instantiate the model a config describes (``adjacency`` is ``Â``, used by graph models)."""
    if isinstance(config, STGNNConfig):
        return STGNN(config, adjacency)
    if isinstance(config, MLPConfig):
        return MLPStudent(config)
    raise TypeError(f"no model for config {type(config).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (buffers such as the constant adjacency are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
