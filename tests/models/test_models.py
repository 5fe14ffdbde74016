"""Reference models: shapes, the graph actually mixes sensors, configs, and dense ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeglm.compress.export import FORBIDDEN_OPS, export_onnx
from edgeglm.errors import ConfigError
from edgeglm.graph import SensorGraph
from edgeglm.models import (
    DenseGraphConv,
    GraphMode,
    MLPConfig,
    STGNNConfig,
    build_model,
    count_parameters,
    model_config_from_dict,
)

N, T = 6, 16
GRAPH = SensorGraph.from_edges([f"s{i}" for i in range(N)], [(f"s{i}", f"s{i + 1}", 1.0) for i in range(N - 1)])


def _configs() -> list:
    return [
        STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, graph=GraphMode.FIXED),
        STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, graph=GraphMode.ADAPTIVE),
        STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, graph=GraphMode.BOTH),
        STGNNConfig(num_nodes=N, window=T, channels=4, blocks=1, graph=GraphMode.NONE),
        MLPConfig(num_nodes=N, window=T, hidden=(32, 16)),
    ]


def test_dense_graph_conv_is_a_hat_x_theta() -> None:
    torch.manual_seed(0)
    conv = DenseGraphConv(3, 5)
    x = torch.randn(2, 3, 4, N)
    adj = torch.from_numpy(GRAPH.normalized())
    got = conv(x, adj)
    w = conv.theta.weight[:, :, 0, 0]  # (out, in)
    want = torch.einsum("ij,bctj,oc->boti", adj, x, w) + conv.theta.bias[None, :, None, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", _configs(), ids=lambda c: f"{c.kind}-{getattr(c, 'graph', '')}")
def test_forward_shape_and_rul_scale(config) -> None:
    model = build_model(config, GRAPH.normalized()).eval()
    out = model(torch.randn(5, T, N))
    assert out.shape == (5, 1)
    assert float(model.rul_cap) == config.rul_cap
    assert count_parameters(model) > 0


def test_graph_mixes_sensors_only_when_there_is_a_graph() -> None:
    """Perturbing sensor 0 changes node 2 (two hops along the chain) only when there is a graph."""
    torch.manual_seed(0)
    x = torch.randn(1, T, N)
    x2 = x.clone()
    x2[:, :, 0] += 3.0
    for mode, expect_change in ((GraphMode.FIXED, True), (GraphMode.NONE, False)):
        cfg = STGNNConfig(num_nodes=N, window=T, channels=8, blocks=3, kernel_size=2, graph=mode)
        model = build_model(cfg, GRAPH.normalized()).eval()
        f1, f2 = model.features(x)[..., 2], model.features(x2)[..., 2]
        assert (not torch.allclose(f1, f2)) is expect_change, mode


def test_config_validation_and_round_trip() -> None:
    for cfg in _configs():
        assert model_config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="receptive field"):
        STGNNConfig(num_nodes=N, window=8, blocks=3)
    with pytest.raises(ConfigError, match="valid: fixed"):
        STGNNConfig(num_nodes=N, window=T, graph="sparse")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown model kind"):
        model_config_from_dict({"kind": "transformer"})
    with pytest.raises(ConfigError, match="unknown model config keys"):
        model_config_from_dict({**_configs()[0].to_dict(), "heads": 4})


def test_pruned_widths_are_config_fields_written_only_when_set() -> None:
    plain = STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2)
    assert "temporal_channels" not in plain.to_dict() and "readout_channels" not in plain.to_dict()
    narrow = STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, temporal_channels=(3, 5), readout_channels=6)
    assert model_config_from_dict(narrow.to_dict()) == narrow
    model = build_model(narrow, GRAPH.normalized())
    assert [b.temporal.out_channels for b in model.blocks] == [3, 5] and model.readout.out_channels == 6
    assert model.layer_config() == narrow and build_model(plain, GRAPH.normalized()).layer_config() == plain
    with pytest.raises(ConfigError, match="must hold 2 widths"):
        STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, temporal_channels=(3,))


@pytest.mark.parametrize(
    "config", _configs()[::2] + _configs()[1:2], ids=lambda c: f"{c.kind}-{getattr(c, 'graph', '')}"
)
def test_export_is_dense_and_matches_torch(config, tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(config, GRAPH.normalized()).eval()
    result = export_onnx(model, tmp_path / "m.onnx", window=T, num_nodes=N)
    proto = onnx.load(str(result.path))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & FORBIDDEN_OPS
    assert result.opset >= 17
    if isinstance(config, STGNNConfig):
        assert "MatMul" in ops  # message passing is a dense product with the constant adjacency
    # dynamic batch: any batch size runs and matches torch within 1e-5
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        x = np.random.default_rng(batch).standard_normal((batch, T, N)).astype(np.float32)
        got = sess.run(None, {"window": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 1)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
