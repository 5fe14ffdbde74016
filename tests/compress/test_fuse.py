"""Fuse pass: outputs stay equal, fewer ops, BatchNorm and the adaptive adjacency folded, standard ops only."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeglm.compress import fuse as fuse_module
from edgeglm.compress.export import export_onnx, op_counts
from edgeglm.compress.fuse import FuseConfig, OrtLevel, fuse
from edgeglm.compress.passes import PassContext, Stage, config_from_table, run_pass
from edgeglm.errors import ConfigError, ExportError
from edgeglm.graph import SensorGraph
from edgeglm.models import GraphMode, STGNNConfig, build_model

N, T = 6, 16
GRAPH = SensorGraph.from_edges([f"s{i}" for i in range(N)], [(f"s{i}", f"s{i + 1}", 1.0) for i in range(N - 1)])
torch.set_num_threads(1)


def _stgnn(graph: GraphMode, seed: int = 0) -> nn.Module:
    """An STGNN with non-trivial BatchNorm statistics, as after training (no training needed to test folding)."""
    torch.manual_seed(seed)
    model = build_model(STGNNConfig(num_nodes=N, window=T, channels=8, blocks=2, graph=graph), GRAPH.normalized())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def _windows(n: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, T, N)).astype(np.float32)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"window": x})[0]


def _export_unoptimized(model: nn.Module, path: Path) -> Path:
    """Dynamo export without the exporter's own optimizer, so nothing is folded yet."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.zeros(2, T, N),),
            dynamo=True,
            input_names=["window"],
            output_names=["rul"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            opset_version=18,
            optimize=False,
        )
    program.save(str(path), external_data=False)
    return path


def _assert_portable(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


@pytest.fixture(scope="module")
def fixed_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = _stgnn(GraphMode.FIXED)
    path = tmp_path_factory.mktemp("fuse") / "fixed.onnx"
    export_onnx(model, path, window=T, num_nodes=N, atol=1e-4)
    return model, path


def test_fuse_keeps_outputs_lowers_op_count_and_folds_batchnorm(fixed_onnx, tmp_path: Path) -> None:
    model, path = fixed_onnx
    before = op_counts(onnx.load(str(path)))
    assert before["BatchNormalization"] == 2
    result = fuse(path, tmp_path / "fused.onnx", check_x=_windows(16, seed=5))

    fused = onnx.load(str(result.path))
    _assert_portable(fused)
    assert "BatchNormalization" not in op_counts(fused)
    assert sum(result.ops_after.values()) < sum(result.ops_before.values())
    assert result.removed_ops["BatchNormalization"] == 2
    assert result.ops_before == before and result.ops_after == op_counts(fused)
    assert result.max_rel_diff <= 1e-5
    # Independently of fuse's own check: the same outputs as the exported graph and as torch.
    x = _windows(64)
    want = _run(path, x)
    got = _run(result.path, x)
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.abs(want).max()))
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - torch_out)) <= 1e-5 * max(1.0, float(np.abs(torch_out).max()))
    record = result.to_record()
    assert record["op_count_after"] < record["op_count_before"]
    assert [s["step"] for s in record["steps"]] == [
        "constant_folding",
        "batchnorm_folding",
        "affine_folding",
        "matmul_add_to_gemm",
        "onnxslim",
        "onnxruntime_basic",
    ]


def test_adaptive_adjacency_becomes_a_constant(tmp_path: Path) -> None:
    model = _stgnn(GraphMode.BOTH)  # fixed Â and the adaptive one, summed
    raw = _export_unoptimized(model, tmp_path / "raw.onnx")
    assert "Softmax" in op_counts(onnx.load(str(raw))), "the unoptimized export computes softmax(relu(E1 E2ᵀ))"

    result = fuse(raw, tmp_path / "fused.onnx", FuseConfig(onnxslim=False, ort_level=OrtLevel.DISABLED))
    fused = onnx.load(str(result.path))
    _assert_portable(fused)
    ops = op_counts(fused)
    assert "Softmax" not in ops and "BatchNormalization" not in ops
    # Every node-mixing MatMul multiplies by an initializer, one of them the folded Âᵀ.
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    matmuls = [n for n in fused.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(n.input[1] in inits for n in matmuls)
    with torch.no_grad():
        adaptive_t = model.adaptive_adjacency().T.numpy()
    assert any(
        inits[n.input[1]].shape == (N, N) and np.allclose(inits[n.input[1]], adaptive_t, atol=1e-6) for n in matmuls
    )
    assert result.removed_ops["Softmax"] == 1
    x = _windows()
    np.testing.assert_allclose(
        _run(result.path, x), _run(raw, x), rtol=0, atol=1e-5 * max(1, np.abs(_run(raw, x)).max())
    )


def test_dynamo_export_already_folds_the_adaptive_adjacency(tmp_path: Path) -> None:
    """What export_onnx ships (optimize=True) has no adjacency subgraph left; fuse keeps it that way."""
    path = tmp_path / "adaptive.onnx"
    export_onnx(_stgnn(GraphMode.ADAPTIVE), path, window=T, num_nodes=N, atol=1e-4)
    ops = op_counts(onnx.load(str(path)))
    assert "Softmax" not in ops and ops["MatMul"] == 2  # one per block, by a constant
    result = fuse(path, tmp_path / "fused.onnx")
    assert result.steps[0].name == "constant_folding" and result.steps[0].rewrites == 0


class _ConvBnMlpBn(nn.Module):
    """Conv → BatchNorm2d directly, and Linear → BatchNorm1d: the textbook folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, (3, 1))
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (T - 2) * N, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x.unsqueeze(1))))
        return self.out(torch.relu(self.bn1(self.fc(h.flatten(1)))))


def test_batchnorm_folds_into_conv_and_gemm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ConvBnMlpBn()
    for bn in (model.bn, model.bn1):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    model.eval()
    # The exporter's optimizer already folds these two (not the STGNN's BatchNorm after a sum).
    path = _export_unoptimized(model, tmp_path / "convbn.onnx")
    assert op_counts(onnx.load(str(path))).get("BatchNormalization") == 2

    result = fuse(path, tmp_path / "fused.onnx", FuseConfig(onnxslim=False, ort_level=OrtLevel.DISABLED))
    assert "BatchNormalization" not in result.ops_after
    assert result.steps[1].name == "batchnorm_folding" and result.steps[1].rewrites == 2
    assert result.steps[1].ops == result.steps[0].ops - 2  # folded, nothing added
    assert result.max_rel_diff <= 1e-5


def _matmul_add_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    s = numpy_helper.from_array(np.array(2.5, np.float32), "s")
    nodes = [
        helper.make_node("MatMul", ["window", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["add"], name="add"),
        helper.make_node("Relu", ["add"], ["relu"], name="relu"),
        helper.make_node("Mul", ["relu", "s"], ["rul"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("rul", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w, b, s],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_matmul_add_becomes_gemm(tmp_path: Path) -> None:
    path = _matmul_add_model(tmp_path / "mm.onnx")
    result = fuse(path, tmp_path / "fused.onnx", FuseConfig(onnxslim=False, ort_level=OrtLevel.DISABLED))
    assert result.ops_after == {"Gemm": 1, "Mul": 1, "Relu": 1}
    assert result.max_rel_diff <= 1e-5


def test_a_fused_graph_that_differs_is_refused_and_not_written(fixed_onnx, tmp_path: Path, monkeypatch) -> None:
    """The equality check is real: corrupt one weight during folding and fuse must refuse."""
    real = fuse_module._fold_batchnorm

    def corrupting(model: onnx.ModelProto) -> int:
        n = real(model)
        conv = next(node for node in model.graph.node if node.op_type == "Conv")
        init = next(t for t in model.graph.initializer if t.name == conv.input[1])
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return n

    monkeypatch.setattr(fuse_module, "_fold_batchnorm", corrupting)
    out = tmp_path / "fused.onnx"
    with pytest.raises(ExportError, match="differs"):
        fuse(fixed_onnx[1], out)
    assert not out.exists()


def test_config_validation_and_toml_values() -> None:
    cfg = config_from_table("fuse", {"ort_level": "disabled", "onnxslim": False})
    assert cfg == FuseConfig(onnxslim=False, ort_level=OrtLevel.DISABLED)
    assert cfg.to_dict()["ort_level"] == "disabled"
    with pytest.raises(ConfigError, match=r"valid: \['disabled', 'basic'\]") as err:
        FuseConfig(ort_level="extended")  # type: ignore[arg-type]
    assert "com.microsoft" in str(err.value)
    with pytest.raises(ConfigError, match="atol"):
        FuseConfig(atol=0)
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_table("fuse", {"level": "basic"})


def _ctx(tmp_path: Path) -> PassContext:
    windows = SimpleNamespace(x=_windows(16, seed=9), y=np.zeros(16, np.float32))
    prepared = SimpleNamespace(train=windows, val=windows)
    return PassContext(prepared=prepared, teacher=nn.Identity(), workdir=tmp_path, threads=1)  # type: ignore[arg-type]


def test_pass_writes_a_new_stage_in_the_workdir(fixed_onnx, tmp_path: Path) -> None:
    stage = Stage(name="exported", onnx_path=fixed_onnx[1], architecture="stgnn")
    result = run_pass(stage, FuseConfig(), _ctx(tmp_path))
    assert result.stage.is_onnx and result.stage.onnx_path.parent == tmp_path
    assert result.stage.architecture == "stgnn" and fixed_onnx[1].exists()
    rec = result.record
    assert rec["op_count_after"] < rec["op_count_before"]
    assert rec["removed_ops"]["BatchNormalization"] == 2 and rec["max_abs_diff"] >= 0
    assert rec["check_inputs"] == 32 + 32 + 16  # random, random-walk and the validation windows


def test_pass_refuses_a_torch_stage(tmp_path: Path) -> None:
    stage = Stage(name="pruned", torch_model=_stgnn(GraphMode.FIXED))
    with pytest.raises(ConfigError, match="export") as err:
        run_pass(stage, FuseConfig(), _ctx(tmp_path))
    assert "[export]" in (err.value.hint or "")
