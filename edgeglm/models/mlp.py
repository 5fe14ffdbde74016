"""Graph-free MLP student."""

from __future__ import annotations

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
        layers: list[nn.Module] = [nn.Flatten()]
        width = config.window * config.num_nodes
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(config.dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.register_buffer("rul_cap", torch.tensor(float(config.rul_cap)))

    def features(self, x: Tensor) -> Tensor:
        """Last hidden layer, ``(batch, hidden[-1])`` (distillation hints)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.rul_cap * self.out(self.body(x))
