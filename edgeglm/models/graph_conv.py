"""Dense graph convolution over a fixed, small sensor graph."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DenseGraphConv"]


class DenseGraphConv(nn.Module):
    r"""Graph convolution as a dense matrix product (Kipf & Welling, ICLR 2017,
    https://arxiv.org/abs/1609.02907), for every time step at once.

    Matrix form, with the normalized adjacency ``Â = D^-1/2 (A + I) D^-1/2`` (see
    :func:`edgeglm.graph.normalize_adjacency`)::

        X' = Â X Θ  (+ b)

    Node-wise: ``x'_i = Σ_j Â_ij Θᵀ x_j``. Sensor graphs are small (10–200 nodes) and
    fixed, so the sparse scatter/gather form of message passing is replaced by one
    ``MatMul`` with a constant ``Â``: ONNX Runtime, TensorRT and LiteRT all run it and the
    INT8 quantizer covers it. ``Θ`` is a 1×1 convolution over channels.

    Args:
        in_channels: features per node and time step.
        out_channels: output features per node and time step.
        bias: learn an additive bias (default: True).

    Shapes:
        x: ``(batch, in_channels, time, nodes)``; adj: ``(nodes, nodes)``;
        output: ``(batch, out_channels, time, nodes)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.theta = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.theta.weight)
        if self.theta.bias is not None:
            nn.init.zeros_(self.theta.bias)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        # (B, C, T, N) @ (N, N)ᵀ mixes nodes: out[..., i] = Σ_j x[..., j] Â_ij.
        return self.theta(torch.matmul(x, adj.transpose(0, 1)))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"
