r"""Fold PyTorch Geometric message passing on a fixed sensor graph into dense layers.

PyG layers gather node features along ``edge_index`` and scatter the messages back
(``index_select`` + ``scatter``): exported to ONNX that is ``Gather`` +
``ScatterElements``/``ScatterND``, which TensorRT, LiteRT conversion and the INT8 quantizer
handle badly or not at all. On a fixed graph of ``N`` sensors (10–200 nodes) the same
operator is a product with a constant ``N × N`` matrix. :func:`fold_pyg` replaces every
supported layer of a user's model by its dense equivalent, carrying the *same* weight
modules, and proves equality on a sample input.

The propagation matrix of a layer on a graph with edges ``e = (j → i)`` of weight ``w_e``
(``j`` = source, ``i`` = target; ``flow="target_to_source"`` swaps the rows of
``edge_index``; duplicate edges add up, as PyG's scatter does)::

    P_ij = Σ_{e: j→i} w_e            (sum / add aggregation, w_e = 1 without weights)
    P_ij = Σ_{e: j→i} w_e / d_i      (mean aggregation, d_i = number of edges into i)

and max / min aggregation is a masked reduction over ``{j : (j → i) ∈ E}`` (0 for a node
without incoming edges, as PyG). The folded layers (see each class for its math):

============  ==============================================================
GCNConv       ``X' = P̂ (X Θ) + b`` with PyG's own ``gcn_norm`` (self loops, ``improved``,
              ``normalize``, the ``cached`` normalization)
SAGEConv      ``X' = agg(X) W_l + b + X W_r`` (``project``, ``root_weight``, ``normalize``)
GraphConv     ``X' = agg_w(X) W_rel + b + X W_root``
GINConv       ``X' = h_Θ((1 + ε) X + P X)``
GATConv       dense masked attention with the same ``lin``/``att`` weights
============  ==============================================================

Convention: the user's model calls ``conv(x, edge_index, ...)``. A folded layer takes the
same arguments and ignores everything but ``x``, so the model's code is unchanged; to
export a model whose ``forward`` takes ``(x, edge_index)``, wrap it in
:class:`FixedGraph`, which stores ``edge_index`` as a buffer and takes ``x`` only. Edge
weights a layer received on the sample call are folded as constants.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.aggr import MaxAggregation, MeanAggregation, MinAggregation, SumAggregation
from torch_geometric.nn.conv import GATConv, GCNConv, GINConv, GraphConv, MessagePassing, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from edgeglm.errors import ConfigError, ExportError

__all__ = [
    "SUPPORTED_LAYERS",
    "FixedGraph",
    "FoldedGATConv",
    "FoldedGCNConv",
    "FoldedGINConv",
    "FoldedGraphConv",
    "FoldedSAGEConv",
    "fold_pyg",
    "propagation_matrix",
]

#: PyG layers :func:`fold_pyg` replaces (exact classes; subclasses may change the math).
SUPPORTED_LAYERS: tuple[type[MessagePassing], ...] = (GCNConv, SAGEConv, GraphConv, GINConv, GATConv)
_AGGREGATIONS = {SumAggregation: "sum", MeanAggregation: "mean", MaxAggregation: "max", MinAggregation: "min"}
# Score of a non-edge in dense attention: exp(−1e30 − max) underflows to exactly 0.
_NO_EDGE = -1e30


def propagation_matrix(
    edge_index: Tensor,
    num_nodes: int,
    *,
    edge_weight: Tensor | None = None,
    flow: str = "source_to_target",
    mean: bool = False,
) -> Tensor:
    """Dense ``P`` with ``P_ij = Σ_{e: j→i} w_e`` (divided by the in-degree ``d_i`` when ``mean``).

    Args:
        edge_index: ``(2, E)`` int64; row 0 the source, row 1 the target for
            ``flow="source_to_target"`` (PyG's default), the other way round otherwise.
        num_nodes: ``N``.
        edge_weight: ``(E,)`` weights ``w_e`` (default: ones).
        flow: PyG's message direction (default: ``"source_to_target"``).
        mean: divide row ``i`` by the number of edges into ``i`` (mean aggregation).

    Shapes: returns ``(N, N)`` float32 (the dtype of ``edge_weight`` if given).
    """
    src, dst = (edge_index[0], edge_index[1]) if flow == "source_to_target" else (edge_index[1], edge_index[0])
    w = edge_weight if edge_weight is not None else torch.ones(edge_index.shape[1])
    p = torch.zeros(num_nodes, num_nodes, dtype=w.dtype)
    p.index_put_((dst, src), w.reshape(-1), accumulate=True)
    if mean:
        deg = torch.zeros(num_nodes, dtype=w.dtype).index_add_(0, dst, torch.ones_like(w.reshape(-1)))
        p = p / deg.clamp(min=1).unsqueeze(1)
    return p


def _edge_mask(edge_index: Tensor, num_nodes: int, flow: str) -> Tensor:
    """``M_ij = True`` iff there is an edge ``j → i``; ``(N, N)`` bool."""
    return propagation_matrix(edge_index, num_nodes, flow=flow) > 0


def _aggregate(x: Tensor, reduce: str, propagation: Tensor, mask: Tensor) -> Tensor:
    """``agg_{j ∈ N(i)} x_j`` along the node axis (−2) of ``x`` ``(..., N, F)``."""
    if reduce in ("sum", "mean"):
        return torch.matmul(propagation, x)
    fill = float("-inf") if reduce == "max" else float("inf")
    values = torch.where(mask.unsqueeze(-1), x.unsqueeze(-3), fill)  # (..., N_i, N_j, F)
    out = values.amax(dim=-2) if reduce == "max" else values.amin(dim=-2)
    has_neighbour = mask.any(dim=1).unsqueeze(-1)
    return torch.where(has_neighbour, out, torch.zeros_like(out))


class _Folded(nn.Module):
    """Base of the folded layers: ``forward(x, *ignored)`` so the user's call sites stay as they are."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.dense(x)

    def dense(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class FoldedGCNConv(_Folded):
    r"""Dense :class:`torch_geometric.nn.conv.GCNConv` on a fixed graph.

    Matrix form ``X' = P̂ X Θ + b`` with ``P̂`` the layer's normalized propagation matrix
    (``D̂^-1/2 (A + fill·I) D̂^-1/2`` from PyG's ``gcn_norm``, fill 2 when ``improved``, no
    self loops and no normalization when ``normalize=False``); node-wise
    ``x'_i = Θᵀ Σ_j P̂_ij x_j + b``.

    Args:
        conv: the PyG layer (its ``lin`` and ``bias`` are reused).
        propagation: ``P̂``, ``(N, N)``.

    Shapes: ``(..., N, in_channels)`` → ``(..., N, out_channels)``.
    """

    def __init__(self, conv: GCNConv, propagation: Tensor) -> None:
        super().__init__()
        self.lin = conv.lin
        self.bias = conv.bias
        self.register_buffer("propagation", propagation)

    def dense(self, x: Tensor) -> Tensor:
        out = torch.matmul(self.propagation, self.lin(x))
        return out if self.bias is None else out + self.bias


class FoldedSAGEConv(_Folded):
    r"""Dense :class:`torch_geometric.nn.conv.SAGEConv` on a fixed graph.

    ``x'_i = W_l · agg_{j ∈ N(i)} s_j + b + W_r x_i`` with ``s_j = relu(W_p x_j + b_p)`` when
    ``project`` else ``x_j``; ``agg`` is sum, mean (``P X``), max or min (masked reduction);
    ``W_r`` only with ``root_weight``; ``x'_i ← x'_i / ‖x'_i‖₂`` when ``normalize``.

    Shapes: ``(..., N, in_channels)`` → ``(..., N, out_channels)``.
    """

    def __init__(self, conv: SAGEConv, reduce: str, propagation: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.reduce = reduce
        self.project = conv.lin if conv.project else None
        self.lin_l = conv.lin_l
        self.lin_r = conv.lin_r if conv.root_weight else None
        self.normalize = conv.normalize
        self.register_buffer("propagation", propagation)
        self.register_buffer("mask", mask)

    def dense(self, x: Tensor) -> Tensor:
        src = x if self.project is None else self.project(x).relu()
        out = self.lin_l(_aggregate(src, self.reduce, self.propagation, self.mask))
        if self.lin_r is not None:
            out = out + self.lin_r(x)
        return F.normalize(out, p=2.0, dim=-1) if self.normalize else out


class FoldedGraphConv(_Folded):
    r"""Dense :class:`torch_geometric.nn.conv.GraphConv` on a fixed graph.

    ``x'_i = W_rel · agg_{j ∈ N(i)} e_ji x_j + b + W_root x_i``; sum and mean are ``P X``
    with the edge weights ``e_ji`` in ``P``; max and min (unweighted only) a masked reduction.

    Shapes: ``(..., N, in_channels)`` → ``(..., N, out_channels)``.
    """

    def __init__(self, conv: GraphConv, reduce: str, propagation: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.reduce = reduce
        self.lin_rel = conv.lin_rel
        self.lin_root = conv.lin_root
        self.register_buffer("propagation", propagation)
        self.register_buffer("mask", mask)

    def dense(self, x: Tensor) -> Tensor:
        return self.lin_rel(_aggregate(x, self.reduce, self.propagation, self.mask)) + self.lin_root(x)


class FoldedGINConv(_Folded):
    r"""Dense :class:`torch_geometric.nn.conv.GINConv` on a fixed graph.

    ``X' = h_Θ((1 + ε) X + agg(X))``, node-wise ``x'_i = h_Θ((1 + ε) x_i + Σ_{j ∈ N(i)} x_j)``
    (sum aggregation by default), with the layer's own ``nn`` as ``h_Θ`` and its ``eps``.

    Shapes: ``(..., N, in_channels)`` → what ``nn`` returns.
    """

    def __init__(self, conv: GINConv, reduce: str, propagation: Tensor, mask: Tensor) -> None:
        super().__init__()
        self.reduce = reduce
        self.nn = conv.nn
        if isinstance(conv.eps, nn.Parameter):
            self.eps = conv.eps
        else:
            self.register_buffer("eps", conv.eps.detach().clone())
        self.register_buffer("propagation", propagation)
        self.register_buffer("mask", mask)

    def dense(self, x: Tensor) -> Tensor:
        return self.nn(_aggregate(x, self.reduce, self.propagation, self.mask) + (1 + self.eps) * x)


class FoldedGATConv(_Folded):
    r"""Dense :class:`torch_geometric.nn.conv.GATConv` on a fixed graph (Veličković et al.,
    ICLR 2018, https://arxiv.org/abs/1710.10903).

    Per head ``h``, with ``z = Θ x`` (``lin``, or ``lin_src``/``lin_dst``) and the edge
    multiplicities ``M_ij`` (self loops replaced by one per node when ``add_self_loops``)::

        e_ij  = LeakyReLU(a_dstᵀ z_i + a_srcᵀ z_j)                 for M_ij > 0
        α_ij  = M_ij exp(e_ij − m_i) / (Σ_k M_ik exp(e_ik − m_k) + 1e-16),   m_i = max_j e_ij
        x'_i  = ‖_h Σ_j α_ij z_j   (concat)   or   mean_h Σ_j α_ij z_j
        x'_i ← x'_i + W_res x_i (residual) + b

    The attention depends on the features, so it is computed densely over all ``N × N``
    pairs and masked, instead of per edge: ``MatMul``, ``Where``, ``ReduceMax``, ``Exp``,
    no scatter. Attention dropout is applied in training mode as in PyG.

    Shapes: ``(..., N, in_channels)`` → ``(..., N, heads · out_channels)`` (concat) or
    ``(..., N, out_channels)``.
    """

    def __init__(self, conv: GATConv, multiplicity: Tensor) -> None:
        super().__init__()
        self.heads, self.channels = conv.heads, conv.out_channels
        self.concat, self.negative_slope, self.dropout = conv.concat, conv.negative_slope, conv.dropout
        if conv.lin is not None:
            self.lin_src = self.lin_dst = conv.lin
        else:
            self.lin_src, self.lin_dst = conv.lin_src, conv.lin_dst
        self.att_src, self.att_dst = conv.att_src, conv.att_dst
        self.res = conv.res
        self.bias = conv.bias
        self.register_buffer("multiplicity", multiplicity)
        self.register_buffer("mask", multiplicity > 0)

    def dense(self, x: Tensor) -> Tensor:
        h, c = self.heads, self.channels
        lead = x.shape[:-2]
        z_src = self.lin_src(x).reshape(*lead, -1, h, c)  # (..., N, H, C)
        z_dst = self.lin_dst(x).reshape(*lead, -1, h, c)
        a_src = (z_src * self.att_src).sum(-1)  # (..., N, H)
        a_dst = (z_dst * self.att_dst).sum(-1)
        e = F.leaky_relu(a_dst.unsqueeze(-2) + a_src.unsqueeze(-3), self.negative_slope)  # (..., N_i, N_j, H)
        mask = self.mask.unsqueeze(-1)
        e = torch.where(mask, e, torch.full_like(e, _NO_EDGE))
        w = torch.exp(e - e.amax(dim=-2, keepdim=True)) * self.multiplicity.unsqueeze(-1)
        alpha = w / (w.sum(dim=-2, keepdim=True) + 1e-16)
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        # Σ_j α_ij z_j per head: (..., H, N_i, N_j) @ (..., H, N_j, C) → (..., N_i, H, C)
        out = torch.matmul(alpha.movedim(-1, -3), z_src.movedim(-2, -3)).movedim(-3, -2)
        out = out.reshape(*lead, -1, h * c) if self.concat else out.mean(dim=-2)
        if self.res is not None:
            out = out + self.res(x)
        return out if self.bias is None else out + self.bias


class FixedGraph(nn.Module):
    """Bind a fixed ``edge_index`` to a model called as ``model(x, edge_index)``.

    ``FixedGraph(model, edge_index)(x) == model(x, edge_index)``; the graph is a buffer, so
    the exported graph takes ``x`` only. Fold first: a folded model ignores the buffer.

    Shapes: ``edge_index`` ``(2, E)`` int64.
    """

    def __init__(self, model: nn.Module, edge_index: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("edge_index", torch.as_tensor(edge_index, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.edge_index)


# -- folding ----------------------------------------------------------------------------------


def fold_pyg(
    model: nn.Module,
    edge_index: Tensor,
    num_nodes: int,
    sample_input: Tensor | Sequence[Any],
    *,
    atol: float = 1e-5,
) -> nn.Module:
    """Return a copy of ``model`` with every PyG layer replaced by its dense equivalent.

    The model is run once on ``sample_input`` (eval mode) to record how each layer is
    called; each folded layer must reproduce its PyG layer on that call, and the folded
    model the whole model's output, within ``atol``. ``model`` is not modified.

    Args:
        model: a user model containing GCNConv, SAGEConv, GraphConv, GINConv or GATConv
            layers, all on the same fixed graph.
        edge_index: the graph, ``(2, E)`` int64 (PyG convention). Every layer must be called
            with exactly this ``edge_index``.
        num_nodes: ``N``; the node axis of the layers' inputs (second to last) must have it.
        sample_input: ``model``'s argument, or a tuple of its positional arguments (e.g.
            ``(x, edge_index)``).
        atol: largest allowed |folded − PyG| (default: 1e-5).

    Returns:
        The folded copy, in eval mode, called like ``model``.

    Raises:
        ConfigError: an unsupported layer (named, with the supported list), an unsupported
            option (aggregation, edge features, bipartite input), or a layer called with
            another graph.
        ExportError: a folded layer or the folded model differs from PyG by more than ``atol``.
    """
    edge_index = torch.as_tensor(edge_index, dtype=torch.long)
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ConfigError(f"fold: edge_index must be (2, E), got shape {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ConfigError(f"fold: edge_index refers to nodes outside 0…{num_nodes - 1}")
    folded = copy.deepcopy(model).eval()
    layers = _find_layers(folded)
    args = tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)

    calls: dict[int, tuple[dict[str, Any], Any]] = {}
    hooks = []
    for _, layer in layers:
        hooks.append(layer.register_forward_hook(_recorder(layer, calls), with_kwargs=True))
    try:
        with torch.no_grad():
            reference = folded(*args)
    finally:
        for hook in hooks:
            hook.remove()

    replacements: dict[int, nn.Module] = {}
    for name, layer in layers:
        if id(layer) in replacements:
            continue
        call = calls.get(id(layer))
        dense = _fold_layer(name, layer, edge_index, num_nodes, call[0] if call else None)
        dense.train(False)
        if call is not None:
            with torch.no_grad():
                got = dense(call[0]["x"])
            _check_close(f"layer {name!r} ({type(layer).__name__})", got, call[1], atol)
        replacements[id(layer)] = dense
    for parent in list(folded.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    folded.eval()
    with torch.no_grad():
        got = folded(*args)
    _check_close(f"folded {type(model).__name__}", got, reference, atol)
    return folded


def _find_layers(model: nn.Module) -> list[tuple[str, MessagePassing]]:
    supported, unsupported = [], []
    for name, m in model.named_modules():
        if isinstance(m, MessagePassing):
            (supported if type(m) in SUPPORTED_LAYERS else unsupported).append((name, m))
    if unsupported:
        found = ", ".join(f"{name!r} ({type(m).__name__})" for name, m in unsupported)
        raise ConfigError(
            f"fold: cannot fold {found}; supported layers: {', '.join(c.__name__ for c in SUPPORTED_LAYERS)}",
            hint="replace the layer by a supported one, or write it as a dense matrix product on the fixed graph",
        )
    return supported


def _recorder(layer: MessagePassing, calls: dict[int, tuple[dict[str, Any], Any]]) -> Any:
    signature = inspect.signature(layer.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if id(module) not in calls:
            bound = signature.bind(*args, **kwargs)
            calls[id(module)] = (dict(bound.arguments), output)

    return hook


def _fold_layer(
    name: str, layer: MessagePassing, edge_index: Tensor, num_nodes: int, call: dict[str, Any] | None
) -> nn.Module:
    label = f"fold: layer {name!r} ({type(layer).__name__})"
    weight = None
    if call is not None:
        weight = _check_call(label, layer, call, edge_index, num_nodes)
    flow = layer.flow
    if isinstance(layer, GCNConv):
        return FoldedGCNConv(layer, _gcn_propagation(layer, edge_index, num_nodes, weight))
    if isinstance(layer, GATConv):
        ei = edge_index
        if layer.add_self_loops:
            ei = ei[:, ei[0] != ei[1]]
            loops = torch.arange(num_nodes).repeat(2, 1)
            ei = torch.cat([ei, loops], dim=1)
        return FoldedGATConv(layer, propagation_matrix(ei, num_nodes, flow=flow))
    reduce = _reduce(label, layer)
    if reduce in ("max", "min") and weight is not None:
        raise ConfigError(
            f"{label}: edge weights with {reduce} aggregation cannot be folded",
            hint="use sum or mean aggregation with edge weights",
        )
    propagation = propagation_matrix(edge_index, num_nodes, edge_weight=weight, flow=flow, mean=reduce == "mean")
    mask = _edge_mask(edge_index, num_nodes, flow)
    if isinstance(layer, SAGEConv):
        return FoldedSAGEConv(layer, reduce, propagation, mask)
    if isinstance(layer, GraphConv):
        return FoldedGraphConv(layer, reduce, propagation, mask)
    return FoldedGINConv(layer, reduce, propagation, mask)  # type: ignore[arg-type]


def _check_call(
    label: str, layer: MessagePassing, call: dict[str, Any], edge_index: Tensor, num_nodes: int
) -> Tensor | None:
    """Validate how the layer was called; return the edge weights it received (or None)."""
    x = call.get("x")
    if not isinstance(x, Tensor):
        raise ConfigError(
            f"{label}: called with {type(x).__name__} node features", hint="bipartite input cannot be folded"
        )
    ei = call.get("edge_index")
    if not isinstance(ei, Tensor) or ei.layout != torch.strided or ei.dim() != 2:
        raise ConfigError(
            f"{label}: called with a {type(ei).__name__} adjacency",
            hint="call the layer with a dense (2, E) edge_index tensor",
        )
    if ei.shape != edge_index.shape or not torch.equal(ei.cpu().long(), edge_index):
        raise ConfigError(
            f"{label}: called with another edge_index than the fixed graph given to fold_pyg",
            hint="every layer must run on the same fixed sensor graph",
        )
    if x.dim() < 2 or x.shape[-2] != num_nodes:
        raise ConfigError(f"{label}: node features of shape {tuple(x.shape)}; expected (..., {num_nodes}, features)")
    node_dim = layer.node_dim if layer.node_dim >= 0 else x.dim() + layer.node_dim
    if node_dim != x.dim() - 2:
        raise ConfigError(f"{label}: node_dim={layer.node_dim} is not the second-to-last axis of x {tuple(x.shape)}")
    for arg in ("size", "edge_attr"):
        if call.get(arg) is not None:
            raise ConfigError(f"{label}: called with {arg}; folding supports node features on a fixed graph only")
    if call.get("return_attention_weights"):
        raise ConfigError(f"{label}: return_attention_weights cannot be folded")
    if isinstance(layer, GATConv) and layer.lin_edge is not None:
        raise ConfigError(f"{label}: edge features (edge_dim={layer.edge_dim}) cannot be folded")
    weight = call.get("edge_weight")
    return None if weight is None else weight.detach().to(x.dtype).reshape(-1)


def _gcn_propagation(layer: GCNConv, edge_index: Tensor, num_nodes: int, weight: Tensor | None) -> Tensor:
    if not layer.normalize:
        return propagation_matrix(edge_index, num_nodes, edge_weight=weight, flow=layer.flow)
    if layer.cached and layer._cached_edge_index is not None:  # what PyG itself uses from now on
        ei, w = layer._cached_edge_index
    else:
        ei, w = gcn_norm(edge_index, weight, num_nodes, layer.improved, layer.add_self_loops, layer.flow)
    return propagation_matrix(ei, num_nodes, edge_weight=w, flow=layer.flow)


def _reduce(label: str, layer: MessagePassing) -> str:
    reduce = _AGGREGATIONS.get(type(layer.aggr_module))  # type: ignore[arg-type]
    if reduce is None:
        raise ConfigError(
            f"{label}: aggregation {layer.aggr!r} cannot be folded",
            hint=f"use one of {', '.join(repr(a) for a in ('sum', 'add', 'mean', 'max', 'min'))}",
        )
    return reduce


def _check_close(what: str, got: Any, want: Any, atol: float) -> None:
    got_t, want_t = _tensors(got), _tensors(want)
    if len(got_t) != len(want_t) or any(a.shape != b.shape for a, b in zip(got_t, want_t, strict=False)):
        raise ExportError(f"fold: {what} returns other shapes than the PyG model")
    diff = max((float((a - b).abs().max()) for a, b in zip(got_t, want_t, strict=True) if a.numel()), default=0.0)
    if not diff <= atol:
        raise ExportError(
            f"fold: {what} differs from PyG by {diff:.3g} (> {atol:g}) on the sample input",
            hint="report the layer and its options; keep it unfolded until fixed",
        )


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    return []
