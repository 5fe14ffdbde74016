"""Pruning: structured removes the asked share of parameters and still runs/exports; unstructured is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeglm.compress.passes import PassContext, PassResult, Stage, config_from_table, run_pass
from edgeglm.compress.prune import Importance, PruneConfig, PruneMode
from edgeglm.errors import ConfigError
from edgeglm.models import (
    MLPConfig,
    STGNNConfig,
    TemporalConv,
    build_model,
    count_parameters,
    model_config_from_dict,
)
from edgeglm.training import Prepared, TrainConfig, fit

WINDOW = 16


@pytest.fixture(scope="module")
def teacher(prepared: Prepared) -> nn.Module:
    torch.manual_seed(0)
    cfg = STGNNConfig(
        num_nodes=prepared.spec.num_sensors, window=WINDOW, channels=16, blocks=2, head_hidden=32, dropout=0.0
    )
    model = build_model(cfg, prepared.graph.normalized())
    fit(model, prepared.train, prepared.val, TrainConfig(epochs=4, batch_size=64, lr=3e-3, threads=1), progress=False)
    return model.eval()


def _ctx(prepared: Prepared, teacher: nn.Module, workdir: Path) -> PassContext:
    return PassContext(prepared=prepared, teacher=teacher, workdir=workdir, progress=False, threads=1)


def _assert_rebuilds_from_config(pruned: nn.Module, prepared: Prepared) -> None:
    """``layer_config()`` holds every pruned width: a fresh model from it loads the weights, same outputs."""
    config = model_config_from_dict(pruned.layer_config().to_dict())
    rebuilt = build_model(config, prepared.graph.normalized())
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.from_numpy(prepared.val.x[:8])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), pruned.eval()(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def structured(prepared: Prepared, teacher: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> PassResult:
    ctx = _ctx(prepared, teacher, tmp_path_factory.mktemp("structured"))
    # no fine-tuning: the pruned weights are the teacher's own, so rows can be traced back
    return run_pass(Stage("teacher", torch_model=teacher), PruneConfig(ratio=0.5, finetune_epochs=0), ctx)


def test_structured_prune_removes_the_asked_share(structured: PassResult, teacher: nn.Module) -> None:
    pruned = structured.stage.torch_model
    assert pruned is not None and pruned is not teacher
    before, after = count_parameters(teacher), count_parameters(pruned)
    assert structured.record["params_before"] == before
    assert structured.record["params_after"] == after
    assert abs((1 - after / before) - 0.5) <= 0.05
    # channels were physically removed, on every kind of layer, the output layer excepted
    channels = structured.record["channels"]
    for name in ("inp", "blocks.0.temporal.conv", "blocks.1.graph.0.theta", "readout", "head.2"):
        assert channels[name][1] < channels[name][0], name
    assert channels["head.4"] == [1, 1]
    assert teacher.blocks[0].temporal.conv.out_channels == 32  # the input stage is untouched
    assert teacher.layer_config() == teacher.config  # unpruned: the config it was built from


def test_structured_pruned_stgnn_rebuilds_from_its_layer_config(structured: PassResult, prepared: Prepared) -> None:
    _assert_rebuilds_from_config(structured.stage.torch_model, prepared)


def test_structured_prune_keeps_gate_halves_paired(structured: PassResult, teacher: nn.Module) -> None:
    """Row i of the tanh half and row C'+i of the sigmoid half come from the same original channel."""
    pruned = structured.stage.torch_model
    for old_block, new_block in zip(teacher.blocks, pruned.blocks, strict=True):
        old, new = old_block.temporal, new_block.temporal
        assert isinstance(new, TemporalConv) and new.conv.out_channels == 2 * new.out_channels
        c_old, c_new = old.out_channels, new.out_channels
        assert c_new < c_old
        # biases are distinct floats and only move with their output channel: they identify rows
        b_old, b_new = old.conv.bias.detach().tolist(), new.conv.bias.detach().tolist()
        f_rows = [b_old[:c_old].index(v) for v in b_new[:c_new]]
        g_rows = [b_old[c_old:].index(v) for v in b_new[c_new:]]
        assert f_rows == g_rows


def test_structured_prune_runs_and_exports(structured: PassResult, prepared: Prepared) -> None:
    pruned = structured.stage.torch_model
    x = prepared.val.x[:64]
    with torch.no_grad():
        y = pruned(torch.from_numpy(x)).numpy()
    assert y.shape == (64, 1) and np.isfinite(y).all()
    # the pass exported the pruned model (export_onnx compared ORT with torch); run it again here
    onnx_path = Path(structured.record["onnx_after"])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"window": x})[0]
    assert np.abs(got - y).max() <= 1e-3
    assert structured.record["onnx_bytes_after"] < structured.record["onnx_bytes_before"]


def test_iterative_taylor_pruning_to_target_params_with_fine_tuning(
    prepared: Prepared, teacher: nn.Module, tmp_path: Path
) -> None:
    before = count_parameters(teacher)
    target = int(before * 0.45)
    cfg = PruneConfig(
        target_params=target, importance=Importance.TAYLOR, steps=2, finetune_epochs=2, finetune_batch_size=64
    )
    result = run_pass(Stage("teacher", torch_model=teacher), cfg, _ctx(prepared, teacher, tmp_path))
    after = count_parameters(result.stage.torch_model)
    assert abs(after - target) <= 0.05 * before
    steps = result.record["steps"]
    assert len(steps) == 2 and before > steps[0]["params"] > steps[1]["params"] == after
    # fine-tuning recovers what pruning lost (steps where pruning cost > 10 % RMSE; there is one)
    base = result.record["val_rmse_before"]
    hurt = [s for s in steps if s["val_rmse_pruned"] > 1.1 * base]
    assert hurt, steps
    for step in hurt:
        assert step["val_rmse_finetuned"] < step["val_rmse_pruned"], step


def test_structured_global_prune_of_an_adaptive_graph_stgnn(prepared: Prepared, tmp_path: Path) -> None:
    """The adaptive adjacency comes from parameters: the graph product must still pass channels through."""
    torch.manual_seed(0)
    cfg = STGNNConfig(num_nodes=prepared.spec.num_sensors, window=WINDOW, channels=12, blocks=2, graph="both")
    model = build_model(cfg, prepared.graph.normalized()).eval()
    result = run_pass(
        Stage("adaptive", torch_model=model),
        PruneConfig(ratio=0.4, global_pruning=True, finetune_epochs=0),
        _ctx(prepared, model, tmp_path),
    )
    pruned = result.stage.torch_model
    assert abs(result.record["params_removed_ratio"] - 0.4) <= 0.05
    assert torch.equal(pruned.emb_src, model.emb_src)  # node embeddings are not channels
    assert pruned(torch.from_numpy(prepared.val.x[:4])).shape == (4, 1)
    assert len(set(pruned.layer_config().block_widths)) > 1  # global ranking: blocks lose different amounts
    _assert_rebuilds_from_config(pruned, prepared)


def test_structured_prune_of_an_mlp(prepared: Prepared, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = build_model(MLPConfig(num_nodes=prepared.spec.num_sensors, window=WINDOW, hidden=(64, 32))).eval()
    cfg = PruneConfig(ratio=0.3, finetune_epochs=0)
    result = run_pass(Stage("mlp", torch_model=mlp), cfg, _ctx(prepared, mlp, tmp_path))
    assert abs(result.record["params_removed_ratio"] - 0.3) <= 0.05
    assert result.record["channels"]["body.1"][1] < 64  # hidden units removed …
    assert result.record["channels"]["out"] == [1, 1]  # … never the output
    _assert_rebuilds_from_config(result.stage.torch_model, prepared)


def test_structured_prune_of_a_time_factorized_mlp_keeps_the_temporal_map(prepared: Prepared, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg_m = MLPConfig(num_nodes=prepared.spec.num_sensors, window=WINDOW, hidden=(48, 24), temporal=8)
    mlp = build_model(cfg_m).eval()
    result = run_pass(
        Stage("tmlp", torch_model=mlp), PruneConfig(ratio=0.3, finetune_epochs=0), _ctx(prepared, mlp, tmp_path)
    )
    pruned = result.stage.torch_model
    assert pruned.time.out_features == 8 and pruned.body[1].in_features == 8 * prepared.spec.num_sensors
    assert pruned.body[1].out_features < 48
    pruned(torch.from_numpy(prepared.val.x[:4]))  # still runs
    _assert_rebuilds_from_config(pruned, prepared)


def test_unstructured_sparsity_is_exact(prepared: Prepared, teacher: nn.Module, tmp_path: Path) -> None:
    cfg = PruneConfig(mode=PruneMode.UNSTRUCTURED, ratio=0.7, steps=2, finetune_epochs=1)
    result = run_pass(Stage("teacher", torch_model=teacher), cfg, _ctx(prepared, teacher, tmp_path))
    model = result.stage.torch_model
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    assert zeros == round(0.7 * total)
    # permanent: plain weights, no masks or hooks left behind
    for m in layers:
        assert isinstance(m.weight, nn.Parameter) and not hasattr(m, "weight_orig") and not m._forward_pre_hooks
    assert count_parameters(model) == count_parameters(teacher)  # same shapes
    rec = result.record
    assert rec["zero_weights"] == zeros and rec["prunable_weights"] == total
    assert rec["zstd_bytes_after"] < 0.8 * rec["zstd_bytes_before"]


# -- configuration -----------------------------------------------------------------------------


def test_config_from_recipe_table() -> None:
    cfg = config_from_table("prune", {"mode": "unstructured", "ratio": 0.3, "steps": 2})
    assert isinstance(cfg, PruneConfig) and cfg.mode is PruneMode.UNSTRUCTURED
    assert PruneConfig().ratio == 0.5  # default when neither ratio nor target_params is given
    assert cfg.to_dict()["mode"] == "unstructured"


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"ratio": 0.5, "target_params": 1000}, "both given"),
        ({"ratio": 1.2}, "ratio must be in"),
        ({"mode": "sideways"}, "valid: 'structured', 'unstructured'"),
        ({"mode": "unstructured", "importance": "taylor"}, "magnitude"),
        ({"steps": 0}, "steps must be"),
    ],
)
def test_bad_config_is_an_error(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**fields)


def test_unknown_field_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_table("prune", {"ratoi": 0.5})


def test_onnx_stage_must_come_after(prepared: Prepared, teacher: nn.Module, tmp_path: Path) -> None:
    stage = Stage("fp32", onnx_path=tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="before export"):
        run_pass(stage, PruneConfig(), _ctx(prepared, teacher, tmp_path))


def test_unreachable_target_is_an_error(prepared: Prepared, teacher: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot reach 10 parameters"):
        run_pass(Stage("t", torch_model=teacher), PruneConfig(target_params=10), _ctx(prepared, teacher, tmp_path))
