"""The sensor graph as data (numpy only, so the runtime reads it without torch).

Nodes are sensors; a weighted, symmetric adjacency ``A`` (zero diagonal) says
which sensors inform each other. Graph convolution uses the symmetrically
normalized adjacency with self loops (Kipf & Welling, ICLR 2017,
https://arxiv.org/abs/1609.02907)::

    Â = D^-1/2 (A + I) D^-1/2,    D_ii = Σ_j (A + I)_ij

A graph comes from a prior (the ground-truth plant topology, e.g. the factory
simulator's line), from correlations on training data (C-MAPSS has no
topology), from a learned adaptive adjacency folded to a constant at export,
or is the identity (no message passing: a per-sensor baseline).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

__all__ = ["GraphSource", "SensorGraph", "normalize_adjacency"]

SCHEMA_VERSION = 1


class GraphSource(str, Enum):
    """Where a sensor graph came from."""

    PRIOR = "prior"
    CORRELATION = "correlation"
    LEARNED = "learned"
    IDENTITY = "identity"


def normalize_adjacency(adj: np.ndarray, *, self_loops: bool = True) -> np.ndarray:
    """Return ``D^-1/2 (A + I) D^-1/2`` (or without ``+ I`` when ``self_loops`` is False).

    Shapes: ``adj`` is ``(N, N)``, non-negative; the result is ``(N, N)`` float32.
    Isolated nodes (zero degree) get a zero row instead of a division by zero.
    """
    a = np.asarray(adj, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square, got shape {a.shape}")
    if self_loops:
        a = a + np.eye(a.shape[0])
    deg = a.sum(axis=1)
    inv_sqrt = np.zeros_like(deg)
    nz = deg > 0
    inv_sqrt[nz] = deg[nz] ** -0.5
    return (inv_sqrt[:, None] * a * inv_sqrt[None, :]).astype(np.float32)


@dataclass(frozen=True)
class SensorGraph:
    """A weighted undirected graph over named sensors.

    Args:
        nodes: sensor names, in the column order of the model input.
        adjacency: ``(N, N)`` float32, symmetric, non-negative, zero diagonal.
        source: how the graph was obtained.
    """

    nodes: tuple[str, ...]
    adjacency: np.ndarray
    source: GraphSource = GraphSource.PRIOR

    def __post_init__(self) -> None:
        a = np.asarray(self.adjacency, dtype=np.float32)
        n = len(self.nodes)
        if a.shape != (n, n):
            raise ValueError(f"adjacency shape {a.shape} does not match {n} nodes")
        if len(set(self.nodes)) != n:
            raise ValueError(f"duplicate node names in {list(self.nodes)}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError("adjacency must be finite and non-negative")
        if not np.allclose(a, a.T, atol=1e-6):
            raise ValueError("adjacency must be symmetric (the sensor graph is undirected)")
        np.fill_diagonal(a, 0.0)
        object.__setattr__(self, "adjacency", a)
        object.__setattr__(self, "source", GraphSource(self.source))

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_edges(self) -> int:
        """Undirected edges with non-zero weight."""
        return int(np.count_nonzero(np.triu(self.adjacency, 1)))

    def normalized(self, *, self_loops: bool = True) -> np.ndarray:
        """``Â`` as float32, see :func:`normalize_adjacency`."""
        return normalize_adjacency(self.adjacency, self_loops=self_loops)

    def edge_index(self) -> np.ndarray:
        """Both directions of every edge as a ``(2, E)`` int64 array (PyG convention)."""
        src, dst = np.nonzero(self.adjacency)
        return np.stack([src, dst]).astype(np.int64)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def identity(cls, nodes: Sequence[str]) -> SensorGraph:
        """No edges: graph convolution reduces to a per-sensor transform."""
        n = len(nodes)
        return cls(tuple(nodes), np.zeros((n, n), np.float32), GraphSource.IDENTITY)

    @classmethod
    def from_edges(
        cls,
        nodes: Sequence[str],
        edges: Iterable[tuple[str, str, float]],
        *,
        source: GraphSource = GraphSource.PRIOR,
    ) -> SensorGraph:
        """Build from ``(a, b, weight)`` triples over node names; edges to absent nodes are dropped."""
        index = {name: i for i, name in enumerate(nodes)}
        a = np.zeros((len(nodes), len(nodes)), np.float32)
        for u, v, w in edges:
            if u in index and v in index and u != v:
                a[index[u], index[v]] = a[index[v], index[u]] = float(w)
        return cls(tuple(nodes), a, source)

    @classmethod
    def from_correlation(cls, nodes: Sequence[str], x: np.ndarray, *, k: int = 3) -> SensorGraph:
        """Connect every sensor to the ``k`` sensors it correlates with most (by ``|ρ|``).

        Args:
            nodes: sensor names, one per column of ``x``.
            x: training readings, ``(rows, N)``; NaN rows are ignored per pair of columns.
            k: neighbours kept per node before symmetrisation (default: 3).
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(nodes):
            raise ValueError(f"x must be (rows, {len(nodes)}), got {x.shape}")
        x = x[np.all(np.isfinite(x), axis=1)]
        std = x.std(axis=0)
        std[std == 0] = 1.0
        z = (x - x.mean(axis=0)) / std
        corr = np.abs(z.T @ z / max(len(z), 1))
        np.fill_diagonal(corr, 0.0)
        a = np.zeros_like(corr)
        k = min(k, len(nodes) - 1)
        for i in range(len(nodes)):
            nbrs = np.argsort(-corr[i])[:k]
            a[i, nbrs] = corr[i, nbrs]
        a = np.maximum(a, a.T)
        return cls(tuple(nodes), a.astype(np.float32), GraphSource.CORRELATION)

    def subgraph(self, nodes: Sequence[str]) -> SensorGraph:
        """The graph induced on ``nodes`` (in that order)."""
        missing = [n for n in nodes if n not in self.nodes]
        if missing:
            raise KeyError(f"nodes {missing} are not in the graph; it has {list(self.nodes)}")
        idx = [self.nodes.index(n) for n in nodes]
        return SensorGraph(tuple(nodes), self.adjacency[np.ix_(idx, idx)], self.source)

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "nodes": list(self.nodes),
            "source": self.source.value,
            "adjacency": [[float(v) for v in row] for row in self.adjacency],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensorGraph:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"sensor graph schema_version {version!r}; this EdgeGLM reads {SCHEMA_VERSION}: upgrade EdgeGLM"
            )
        return cls(tuple(d["nodes"]), np.asarray(d["adjacency"], np.float32), GraphSource(d["source"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> SensorGraph:
        return cls.from_dict(json.loads(text))
