"""Folding PyG layers on a fixed graph: equality with PyG per layer and option, ONNX op set, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch_geometric.nn import ChebConv, GATConv, GCNConv, GINConv, GraphConv, MessagePassing, SAGEConv

from edgeglm.compress.export import FORBIDDEN_OPS, op_counts
from edgeglm.compress.fold import (
    FixedGraph,
    FoldedGATConv,
    FoldedGCNConv,
    FoldedGINConv,
    FoldedGraphConv,
    FoldedSAGEConv,
    fold_pyg,
    propagation_matrix,
)
from edgeglm.data.factory import line_graph
from edgeglm.errors import ConfigError, ExportError

GRAPH = line_graph()
N = GRAPH.num_nodes
F_IN = 5


def _edge_index() -> torch.Tensor:
    """The line's sensor graph plus the awkward cases: a one-way edge, a duplicate, a self loop."""
    ei = torch.from_numpy(GRAPH.edge_index())
    extra = torch.tensor([[0, ei[0, 0].item(), 4], [N - 1, ei[1, 0].item(), 4]])
    return torch.cat([ei, extra], dim=1)


EDGE_INDEX = _edge_index()


class _One(nn.Module):
    """A user model with one layer, called as PyG users do: ``conv(x, edge_index[, edge_weight])``."""

    def __init__(self, conv: nn.Module, edge_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.edge_weight = edge_weight

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.edge_weight is None:
            return self.conv(x, edge_index)
        return self.conv(x, edge_index, self.edge_weight)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-zero biases and attention vectors, so every term of the layer shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _assert_folds(conv: nn.Module, folded_type: type, *, edge_weight: torch.Tensor | None = None, batch: int = 0):
    _randomize(conv)
    g = torch.Generator().manual_seed(1)
    shape = (batch, N, F_IN) if batch else (N, F_IN)
    x = torch.randn(*shape, generator=g)
    model = _One(conv, edge_weight).eval()
    folded = fold_pyg(model, EDGE_INDEX, N, (x, EDGE_INDEX))
    assert isinstance(folded.conv, folded_type)
    assert type(model.conv) is type(conv)  # the user's model is left alone
    with torch.no_grad():
        want = conv.eval()(x, EDGE_INDEX) if edge_weight is None else conv.eval()(x, EDGE_INDEX, edge_weight)
        got = folded.conv(x)  # the folded layer needs no graph
        x2 = torch.randn(*shape, generator=g)  # equality is not a property of the sample input
        want2 = model(x2, EDGE_INDEX)
        got2 = folded(x2, EDGE_INDEX)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5
    assert float((got2 - want2).abs().max()) <= 1e-5


# -- one test per layer type, parametrized over its options ----------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"improved": True},
        {"add_self_loops": False},
        {"normalize": False},
        {"cached": True},
        {"flow": "target_to_source"},
        {"bias": False},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default",
)
def test_fold_gcnconv_matches_pyg(kwargs: dict) -> None:
    _assert_folds(GCNConv(F_IN, 7, **kwargs), FoldedGCNConv)


def test_fold_gcnconv_with_edge_weights_and_batch_matches_pyg() -> None:
    w = torch.rand(EDGE_INDEX.shape[1], generator=torch.Generator().manual_seed(3)) + 0.1
    _assert_folds(GCNConv(F_IN, 7), FoldedGCNConv, edge_weight=w)
    _assert_folds(GCNConv(F_IN, 7), FoldedGCNConv, batch=3)  # (batch, nodes, features), node_dim=-2


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"aggr": "sum"},
        {"aggr": "max"},
        {"aggr": "min"},
        {"project": True, "normalize": True},
        {"root_weight": False, "bias": False},
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default",
)
def test_fold_sageconv_matches_pyg(kwargs: dict) -> None:
    _assert_folds(SAGEConv(F_IN, 7, **kwargs), FoldedSAGEConv)


@pytest.mark.parametrize("aggr", ["add", "mean", "max"])
def test_fold_graphconv_matches_pyg(aggr: str) -> None:
    _assert_folds(GraphConv(F_IN, 7, aggr=aggr), FoldedGraphConv)
    if aggr != "max":
        w = torch.rand(EDGE_INDEX.shape[1], generator=torch.Generator().manual_seed(4)) + 0.1
        _assert_folds(GraphConv(F_IN, 7, aggr=aggr), FoldedGraphConv, edge_weight=w)


@pytest.mark.parametrize("eps,train_eps", [(0.0, False), (0.3, True)])
def test_fold_ginconv_matches_pyg(eps: float, train_eps: bool) -> None:
    mlp = nn.Sequential(nn.Linear(F_IN, 16), nn.ReLU(), nn.Linear(16, 7))
    conv = GINConv(mlp, eps=eps, train_eps=train_eps)
    _assert_folds(conv, FoldedGINConv)
    if train_eps:  # a learned ε was randomized: the (1 + ε) x term is exercised
        assert float(conv.eps.detach()) != 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"heads": 3},
        {"heads": 3, "concat": False, "negative_slope": 0.1},
        {"heads": 2, "add_self_loops": False},  # keeps the graph's own self loop (node 4)
        {"heads": 2, "residual": True},
        {"heads": 2, "in_channels": (F_IN, F_IN)},  # separate lin_src / lin_dst
    ],
    ids=["default", "heads", "mean-heads", "no-self-loops", "residual", "lin-src-dst"],
)
def test_fold_gatconv_matches_pyg(kwargs: dict) -> None:
    kwargs = dict(kwargs)
    in_channels = kwargs.pop("in_channels", F_IN)
    _assert_folds(GATConv(in_channels, 4, **kwargs), FoldedGATConv)


def test_propagation_matrix_counts_duplicates_and_direction() -> None:
    ei = torch.tensor([[0, 0, 1], [1, 1, 2]])  # 0→1 twice, 1→2
    p = propagation_matrix(ei, 3)
    assert p[1, 0] == 2 and p[2, 1] == 1 and p.sum() == 3
    p_mean = propagation_matrix(ei, 3, mean=True)
    assert p_mean[1, 0] == 1 and p_mean[2, 1] == 1
    assert torch.equal(propagation_matrix(ei, 3, flow="target_to_source"), p.T)


# -- a whole model: export has no scatter/gather -------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                GCNConv(F_IN, 8),
                SAGEConv(8, 8, aggr="max"),
                GraphConv(8, 8),
                GINConv(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))),
                GATConv(8, 4, heads=2),
            ]
        )
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x, edge_index))
        return self.out(x)


def _export_ops(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[dict[str, int], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=["x"], verbose=False)
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(path))), sess.run(None, {"x": x.numpy()})[0]


def test_folded_model_exports_without_sparse_ops(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(N, F_IN)
    folded = fold_pyg(model, EDGE_INDEX, N, (x, EDGE_INDEX))
    ops, got = _export_ops(FixedGraph(folded, EDGE_INDEX), x, tmp_path / "folded.onnx")
    assert not FORBIDDEN_OPS & set(ops), ops
    assert "MatMul" in ops
    with torch.no_grad():
        want = model(x, EDGE_INDEX).numpy()
    assert np.abs(got - want).max() <= 1e-5
    # the check bites: PyG's own message passing exports as scatter/gather
    pyg_ops, _ = _export_ops(FixedGraph(model, EDGE_INDEX), x, tmp_path / "pyg.onnx")
    assert FORBIDDEN_OPS & set(pyg_ops)


# -- errors ------------------------------------------------------------------------------------


class _MyConv(MessagePassing):
    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.propagate(edge_index, x=x)


@pytest.mark.parametrize("conv,name", [(ChebConv(F_IN, 7, K=2), "ChebConv"), (_MyConv(), "_MyConv")])
def test_unsupported_layer_is_named_with_the_supported_list(conv: nn.Module, name: str) -> None:
    x = torch.randn(N, F_IN)
    with pytest.raises(ConfigError) as err:
        fold_pyg(_One(conv), EDGE_INDEX, N, (x, EDGE_INDEX))
    msg = str(err.value)
    assert f"'conv' ({name})" in msg
    for supported in ("GCNConv", "SAGEConv", "GraphConv", "GINConv", "GATConv"):
        assert supported in msg


def test_unsupported_aggregation_is_an_error() -> None:
    x = torch.randn(N, F_IN)
    with pytest.raises(ConfigError, match="aggregation 'std'"):
        fold_pyg(_One(SAGEConv(F_IN, 7, aggr="std")), EDGE_INDEX, N, (x, EDGE_INDEX))


def test_layer_on_another_graph_is_an_error() -> None:
    x = torch.randn(N, F_IN)
    other = EDGE_INDEX[:, :-1]
    with pytest.raises(ConfigError, match="another edge_index"):
        fold_pyg(_One(GCNConv(F_IN, 7)), EDGE_INDEX, N, (x, other))


def test_fold_mismatch_raises_export_error(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FoldedGCNConv.dense
    monkeypatch.setattr(FoldedGCNConv, "dense", lambda self, x: original(self, x) + 1e-3)
    x = torch.randn(N, F_IN)
    with pytest.raises(ExportError, match=r"layer 'conv' \(GCNConv\) differs"):
        fold_pyg(_One(GCNConv(F_IN, 7)), EDGE_INDEX, N, (x, EDGE_INDEX))
