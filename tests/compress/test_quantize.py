"""Quantize pass: QDQ graph that ONNX Runtime runs, within the budget, float nodes kept and explained, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeglm.compress.export import export_onnx, op_counts
from edgeglm.compress.fuse import fuse
from edgeglm.compress.passes import PassContext, Stage, config_from_table, run_pass
from edgeglm.compress.quantize import (
    CalibrationMethod,
    CalibrationReader,
    QuantizeConfig,
    WindowReader,
    quantize,
)
from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.errors import ConfigError
from edgeglm.metrics import rmse
from edgeglm.models import STGNNConfig, build_model
from edgeglm.training import TrainConfig, fit, prepare

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A small STGNN trained briefly on the simulator, exported and fused."""
    prepared = prepare(simulate_line(LineConfig(units_train=12, units_test=4), seed=0), window=30)
    cfg = STGNNConfig(num_nodes=prepared.spec.num_sensors, window=30, channels=8, blocks=2, head_hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg, prepared.graph.normalized())
    fit(model, prepared.train, prepared.val, TrainConfig(epochs=3, threads=1), progress=False)
    folder = tmp_path_factory.mktemp("quantize")
    export_onnx(model, folder / "fp32.onnx", window=30, num_nodes=cfg.num_nodes, atol=1e-3)
    fused = fuse(folder / "fp32.onnx", folder / "fused.onnx", check_x=prepared.val.x[:32]).path
    # Half the validation windows keep the accuracy loop quick; the budget logic is the same.
    val = SimpleNamespace(x=prepared.val.x[::2], y=prepared.val.y[::2])
    return SimpleNamespace(prepared=prepared, model=model, fused=fused, val=val)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"window": x})[0]


def _weight_is_dequantized(model: onnx.ModelProto, node_name: str) -> bool:
    node = next(n for n in model.graph.node if n.name == node_name)
    producer = {o: n for n in model.graph.node for o in n.output}.get(node.input[1])
    return producer is not None and producer.op_type == "DequantizeLinear"


def _ctx(trained: SimpleNamespace, tmp_path: Path, train_x: np.ndarray | None = None) -> PassContext:
    class _NeverRead:
        @property
        def x(self) -> np.ndarray:
            raise AssertionError("the quantize pass read the test split")

    prepared = SimpleNamespace(
        train=SimpleNamespace(x=trained.prepared.train.x if train_x is None else train_x),
        val=trained.val,
        test=_NeverRead(),
    )
    return PassContext(prepared=prepared, teacher=nn.Identity(), workdir=tmp_path, threads=1)  # type: ignore[arg-type]


def test_pass_writes_a_qdq_graph_that_runs_and_holds_the_budget(trained, tmp_path: Path) -> None:
    """Calibrated on training windows (never test), budget on validation, through the pass registry."""
    stage = Stage(name="fused", onnx_path=trained.fused, architecture="stgnn")
    result = run_pass(stage, QuantizeConfig(), _ctx(trained, tmp_path))

    path = result.stage.onnx_path
    assert result.stage.name == "int8" and path.parent == tmp_path
    qmodel = onnx.load(str(path))
    onnx.checker.check_model(qmodel)
    ops = op_counts(qmodel)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert {n.domain for n in qmodel.graph.node} <= {""}
    rec = result.record
    assert rec["quantize_linear"] == ops["QuantizeLinear"] and rec["dequantize_linear"] == ops["DequantizeLinear"]
    assert rec["method"] == "percentile" and rec["calibration_windows"] == 512
    # The recorded ΔRMSE is what ONNX Runtime gives on the validation windows, and it is within budget.
    x, y = trained.val.x, trained.val.y
    measured = rmse(_run(path, x), y) - rmse(_run(trained.fused, x), y)
    assert rec["delta_rmse"] == pytest.approx(measured, abs=1e-4)
    assert rec["within_budget"] and abs(rec["delta_rmse"]) <= 0.3
    assert rec["drift_rmse"] > 0  # INT8 does change the predictions
    assert np.all(np.isfinite(_run(path, trained.prepared.test.x)))
    assert path.stat().st_size < trained.fused.stat().st_size


def test_keep_float_keeps_the_named_nodes_in_float(trained, tmp_path: Path) -> None:
    fused = onnx.load(str(trained.fused))
    convs = [n.name for n in fused.graph.node if n.op_type == "Conv"]
    first_temporal = convs[1]  # convs[0] lifts the input to channels; then block 0's gated temporal conv
    cfg = QuantizeConfig(keep_float=(first_temporal,), max_float_nodes=0)
    result = quantize(
        trained.fused,
        tmp_path / "q.onnx",
        cfg,
        WindowReader(trained.prepared.train.x),
        val_x=trained.val.x,
        val_y=trained.val.y,
    )

    qmodel = onnx.load(str(result.path))
    assert not _weight_is_dequantized(qmodel, first_temporal)
    kept = next(n for n in qmodel.graph.node if n.name == first_temporal)
    assert kept.input[1] in {t.name for t in qmodel.graph.initializer}  # the float weight itself
    assert all(_weight_is_dequantized(qmodel, name) for name in convs if name != first_temporal)
    assert [(n.name, n.reason) for n in result.float_nodes] == [(first_temporal, "keep_float")]
    assert result.quantizations == 1


def test_accuracy_loop_keeps_the_most_sensitive_nodes_in_float(trained, tmp_path: Path) -> None:
    """A coarse calibration (ranges 20× too wide) moves the predictions for sure; the loop must win it back."""

    class CoarseReader:
        def __iter__(self):
            for batch in WindowReader(trained.prepared.train.x, limit=128, batch=32):
                yield {"window": batch["window"] * 20.0}

    assert isinstance(CoarseReader(), CalibrationReader)
    cfg = QuantizeConfig(method=CalibrationMethod.MINMAX, accuracy_budget=0.05, max_float_nodes=3)
    x, y = trained.val.x, trained.val.y
    result = quantize(trained.fused, tmp_path / "q.onnx", cfg, CoarseReader(), val_x=x, val_y=y)

    assert abs(result.delta_rmse_initial) > cfg.accuracy_budget
    assert 1 <= len(result.float_nodes) <= 3
    assert all(n.reason == "accuracy" for n in result.float_nodes)
    # The nodes kept are the most sensitive ones, in order, each with the numbers that justified it.
    ranked = list(result.sensitivity)
    assert [n.name for n in result.float_nodes] == ranked[: len(result.float_nodes)]
    first = result.float_nodes[0]
    assert first.drift_alone == result.sensitivity[first.name].drift > 0
    assert result.float_nodes[-1].delta_rmse_after == pytest.approx(result.delta_rmse)
    assert abs(result.delta_rmse) < abs(result.delta_rmse_initial)
    assert result.drift < result.drift_initial
    assert result.quantizations == 1 + len(result.sensitivity) + len(result.float_nodes)
    # The saved graph is the one measured last: the kept nodes have float weights there.
    qmodel = onnx.load(str(result.path))
    for n in result.float_nodes:
        if n.op_type in ("Conv", "Gemm"):
            assert not _weight_is_dequantized(qmodel, n.name)
    assert rmse(_run(result.path, x), y) - result.rmse_fp32 == pytest.approx(result.delta_rmse, abs=1e-4)
    rec = result.to_record()
    assert rec["kept_float"][0]["reason"] == "accuracy" and "delta_rmse_after" in rec["kept_float"][0]


def test_window_reader_draws_evenly_from_the_given_windows() -> None:
    x = np.arange(1000 * 2 * 3, dtype=np.float32).reshape(1000, 2, 3)
    reader = WindowReader(x, limit=100, batch=16)
    assert isinstance(reader, CalibrationReader) and len(reader) == 100
    batches = list(reader)
    assert [len(b["window"]) for b in batches] == [16] * 6 + [4]
    firsts = np.concatenate([b["window"][:, 0, 0] for b in batches]) / 6
    assert firsts[0] == 0 and firsts[-1] == 999 and np.all(np.diff(firsts) > 0)
    assert len(list(reader)) == 7  # iterable again
    assert len(WindowReader(x[:10], limit=512)) == 10


def test_too_small_calibration_set_is_a_config_error(trained, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too small"):
        QuantizeConfig(calibration_size=32)
    with pytest.raises(ConfigError, match="too small") as err:
        quantize(
            trained.fused,
            tmp_path / "q.onnx",
            QuantizeConfig(),
            WindowReader(trained.prepared.train.x, limit=40),
            val_x=trained.val.x,
            val_y=trained.val.y,
        )
    assert "40 windows" in str(err.value) and err.value.hint
    stage = Stage(name="fused", onnx_path=trained.fused)
    with pytest.raises(ConfigError, match="≥ 64 training windows, found 20"):
        run_pass(stage, QuantizeConfig(), _ctx(trained, tmp_path, train_x=trained.prepared.train.x[:20]))
    with pytest.raises(ConfigError, match="validation windows"):
        quantize(
            trained.fused,
            tmp_path / "q.onnx",
            QuantizeConfig(),
            WindowReader(trained.prepared.train.x),
            val_x=trained.val.x[:0],
            val_y=trained.val.y[:0],
        )


def test_unknown_method_and_bad_fields_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid: minmax, percentile, entropy"):
        QuantizeConfig(method="kl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="valid: minmax, percentile, entropy"):
        config_from_table("quantize", {"method": "histogram"})
    cfg = config_from_table("quantize", {"method": "Entropy", "keep_float": ["node_conv2d_1"], "op_types": ["Conv"]})
    assert cfg.method is CalibrationMethod.ENTROPY and cfg.keep_float == ("node_conv2d_1",)
    assert cfg.to_dict()["method"] == "entropy"
    with pytest.raises(ConfigError, match="valid: uint8, int8"):
        QuantizeConfig(activation_type="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot be quantized"):
        QuantizeConfig(op_types=("Tanh",))
    with pytest.raises(ConfigError, match="accuracy_budget"):
        QuantizeConfig(accuracy_budget=-1)
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_table("quantize", {"budget": 0.3})


def test_keep_float_must_name_nodes_of_the_graph(trained, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not_a_node"):
        quantize(
            trained.fused,
            tmp_path / "q.onnx",
            QuantizeConfig(keep_float=("not_a_node",)),
            WindowReader(trained.prepared.train.x),
            val_x=trained.val.x,
            val_y=trained.val.y,
        )


def test_pass_refuses_a_torch_stage(trained, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="torch model") as err:
        run_pass(Stage(name="distilled", torch_model=trained.model), QuantizeConfig(), _ctx(trained, tmp_path))
    assert "[export]" in (err.value.hint or "")
