"""Graph-free MLP student."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from edgeglm.models.config import MLPConfig

__all__ = ["MLPStudent"]


class MLPStudent(nn.Module):
    r"""A multilayer perceptron over the flattened window, no graph at inference.

    GLNN (Zhang et al., "Graph-less Neural Networks", ICLR 2022,
    https://arxiv.org/abs/2110.08727) shows that an MLP distilled from a GNN keeps most
    of its accuracy at a fraction of the latency; on a gateway CPU that is the cheapest
    model there is::

        rul = rul_cap · W_L σ(… σ(W_1 vec(X) + b_1) …) + b_L

    Args:
        config: widths and dropout.

    Shapes: ``(batch, window, nodes)`` → ``(batch, 1)`` RUL in cycles.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        # optional factorized input: one linear map over time, shared by every sensor
        self.time = nn.Linear(config.window, config.temporal) if config.temporal else None
        layers: list[nn.Module] = [nn.Flatten()]
        width = (config.temporal or config.window) * config.num_nodes
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.register_buffer("rul_cap", torch.tensor(float(config.rul_cap)))

    def layer_config(self) -> MLPConfig:
        """The config of this model's current layer widths (structured pruning narrows the
        hidden layers, not :attr:`config`): ``MLPStudent(model.layer_config())`` rebuilds it."""
        hidden = tuple(m.out_features for m in self.body if isinstance(m, nn.Linear))
        temporal = self.time.out_features if self.time is not None else 0
        return replace(self.config, hidden=hidden, temporal=temporal)

    def _inputs(self, x: Tensor) -> Tensor:
        # (batch, window, nodes) → (batch, nodes, temporal) when factorized
        return x if self.time is None else self.time(x.transpose(1, 2))

    def features(self, x: Tensor) -> Tensor:
        """Last hidden layer, ``(batch, hidden[-1])`` (distillation hints)."""
        return self.body(self._inputs(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.rul_cap * self.out(self.body(self._inputs(x)))
