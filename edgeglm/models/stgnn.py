"""Spatio-temporal graph neural network for remaining-useful-life regression."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeglm.models.config import GraphMode, STGNNConfig
from edgeglm.models.graph_conv import DenseGraphConv

__all__ = ["STGNN", "TemporalConv"]


class TemporalConv(nn.Module):
    r"""Gated dilated temporal convolution, shared by all nodes (as in Graph WaveNet,
    Wu et al., IJCAI 2019, https://arxiv.org/abs/1906.00121)::

        h' = tanh(W_f ⋆_d h) ⊙ σ(W_g ⋆_d h)

    where ``⋆_d`` is a 1-D convolution along time with dilation ``d`` and no padding,
    so the time axis shrinks by ``(kernel_size − 1)·d``.

    Shapes: ``(batch, in_channels, time, nodes)`` → ``(batch, out_channels, time − (k−1)d, nodes)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, (kernel_size, 1), dilation=(dilation, 1))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        f, g = self.conv(x).split(self.out_channels, dim=1)
        return torch.tanh(f) * torch.sigmoid(g)


class _Block(nn.Module):
    def __init__(self, channels: int, width: int, kernel_size: int, dilation: int, supports: int) -> None:
        super().__init__()
        self.temporal = TemporalConv(channels, width, kernel_size, dilation)
        self.graph = nn.ModuleList(DenseGraphConv(width, channels) for _ in range(supports))
        self.norm = nn.BatchNorm2d(channels)
        self.shrink = (kernel_size - 1) * dilation

    def forward(self, x: Tensor, adjs: list[Tensor]) -> Tensor:
        h = self.temporal(x)
        g = sum(conv(h, a) for conv, a in zip(self.graph, adjs, strict=True))
        return F.relu(self.norm(g + x[:, :, self.shrink :, :]))


class STGNN(nn.Module):
    r"""The reference teacher (and, smaller, the GNN student).

    ``blocks`` spatio-temporal blocks, each: gated temporal conv (dilation ``2^b``) →
    graph conv over every support (fixed ``Â`` and/or the adaptive one) → residual →
    BatchNorm → ReLU; then a learned temporal read-out (a conv spanning the remaining
    time steps), a two-layer head over all nodes, and ``rul = rul_cap · head(·)``.

    The adaptive adjacency (Graph WaveNet) is ``softmax(relu(E₁ E₂ᵀ))`` from learned node
    embeddings ``E₁, E₂ ∈ ℝ^{N×e}``; it depends on parameters only, so export folds it to a
    constant. ``GraphMode.NONE`` uses ``Â = I`` (no message passing).

    Args:
        config: the architecture.
        adjacency: normalized adjacency ``Â`` (``(N, N)``, see :meth:`SensorGraph.normalized`);
            required for ``FIXED`` and ``BOTH``, ignored otherwise.

    Shapes: input ``(batch, window, nodes)`` normalized readings → output ``(batch, 1)`` RUL in cycles.
    """

    def __init__(self, config: STGNNConfig, adjacency: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = config
        n, c = config.num_nodes, config.channels
        mode = config.graph
        if mode in (GraphMode.FIXED, GraphMode.BOTH):
            if adjacency is None:
                raise ValueError(f"STGNN(graph={mode.value}) needs the normalized adjacency")
            adj = torch.as_tensor(np.asarray(adjacency, np.float32))
            if adj.shape != (n, n):
                raise ValueError(f"adjacency shape {tuple(adj.shape)} does not match num_nodes={n}")
        else:
            adj = torch.eye(n)
        self.register_buffer("adj", adj)
        if mode in (GraphMode.ADAPTIVE, GraphMode.BOTH):
            self.emb_src = nn.Parameter(torch.randn(n, config.embed_dim) * 0.1)
            self.emb_dst = nn.Parameter(torch.randn(n, config.embed_dim) * 0.1)
        supports = 2 if mode is GraphMode.BOTH else 1
        self.inp = nn.Conv2d(1, c, kernel_size=1)
        self.blocks = nn.ModuleList(
            _Block(c, w, config.kernel_size, 2**b, supports) for b, w in enumerate(config.block_widths)
        )
        remaining = config.window - (config.receptive_field - 1)
        r = config.readout_width
        self.readout = nn.Conv2d(c, r, kernel_size=(remaining, 1))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(r * n, config.head_hidden),
            nn.ReLU(),
            nn.Linear(config.head_hidden, 1),
        )
        self.register_buffer("rul_cap", torch.tensor(float(config.rul_cap)))

    def adaptive_adjacency(self) -> Tensor:
        """``softmax(relu(E₁ E₂ᵀ))`` row-wise, ``(N, N)``."""
        return torch.softmax(F.relu(self.emb_src @ self.emb_dst.T), dim=1)

    def supports(self) -> list[Tensor]:
        mode = self.config.graph
        if mode is GraphMode.ADAPTIVE:
            return [self.adaptive_adjacency()]
        if mode is GraphMode.BOTH:
            return [self.adj, self.adaptive_adjacency()]
        return [self.adj]

    def layer_config(self) -> STGNNConfig:
        """The config of this model's current layer widths.

        Structured pruning removes channels from the layers, not from :attr:`config`; this
        reads the widths back (residual stream, each block's gated conv, read-out, head), so
        ``STGNN(model.layer_config())`` rebuilds a model the pruned weights load into.
        """
        c = self.inp.out_channels
        temporal = tuple(block.temporal.conv.out_channels // 2 for block in self.blocks)
        readout = self.readout.out_channels
        return replace(
            self.config,
            channels=c,
            temporal_channels=() if set(temporal) == {c} else temporal,  # unpruned: the plain config
            readout_channels=None if readout == c else readout,
            head_hidden=self.head[-1].in_features,
        )

    def features(self, x: Tensor) -> Tensor:
        """Per-node features after the read-out, ``(batch, readout_channels, 1, nodes)`` (distillation hints)."""
        h = self.inp(x.unsqueeze(1))  # (B, 1, T, N) → (B, C, T, N)
        adjs = self.supports()
        for block in self.blocks:
            h = block(h, adjs)
        return F.relu(self.readout(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.rul_cap * self.head(self.features(x))
