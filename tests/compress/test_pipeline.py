"""`edgeglm compress` end to end on a tiny checkpoint: every stage measured, report written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeglm.checkpoint import load_checkpoint, load_model
from edgeglm.cli import main
from edgeglm.compress.pipeline import compress_checkpoint
from edgeglm.compress.recipe import parse_recipe
from edgeglm.errors import CheckpointError, ConfigError

SMALL = "factory?seed=5&units_train=14&units_test=5"
RECIPE = """
[recipe]
name = "tiny"
[[pass]]
kind = "distill"
student = "mlp"
hidden = [32, 16]
epochs = 2
[[pass]]
kind = "prune"
ratio = 0.3
steps = 1
finetune_epochs = 1
[[pass]]
kind = "fuse"
[[pass]]
kind = "quantize"
calibration_size = 128
accuracy_budget = 50.0
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "teacher"
    assert main(["train", "--data", SMALL, "--epochs", "2", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_compress_runs_every_stage_and_writes_the_report(checkpoint: Path, tmp_path: Path) -> None:
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(RECIPE)
    out = tmp_path / "out"
    assert (
        main(
            [
                "compress",
                str(checkpoint),
                "--out",
                str(out),
                "--recipe",
                str(recipe_file),
                "--quiet",
                "--latency-runs",
                "20",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["teacher", "student", "pruned", "fused", "int8"]
    for stage in report["stages"]:
        for key in ("val_rmse", "test_rmse", "size_bytes", "zstd_bytes", "latency_b1_ms", "latency_b64_ms"):
            assert stage[key] > 0, (stage["name"], key)
    assert report["size_int8"] < report["size_fp32"]
    assert {"rmse_fp32", "rmse_int8", "speedup_b1", "speedup_b64", "size_ratio"} <= set(report)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for name in ("window_spec.json", "graph.json", "report.md", "report.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| int8 | quantize |" in md and "scratch" in json.dumps(report["stages"][1]["record"])
    # the last torch stage (the pruned student) is kept for LiteRT, with its pruned widths in model.json
    torch_model = load_checkpoint(out / "torch_model")
    assert torch_model.model_config.kind == "mlp" and torch_model.metrics["stage"] == "pruned"
    assert sum(torch_model.model_config.hidden) < 32 + 16
    assert load_model(torch_model)(torch.from_numpy(np.load(out / "golden_windows.npy"))).shape == (8, 1)


def test_recipe_for_another_model_kind_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    recipe = parse_recipe('[recipe]\nmodel = "mlp"\n[[pass]]\nkind = "fuse"\n')
    with pytest.raises(CheckpointError, match="is for 'mlp' models but checkpoint"):
        compress_checkpoint(checkpoint, tmp_path / "x", recipe=recipe, progress=False)


def test_too_few_calibration_windows_is_refused(tmp_path: Path) -> None:
    tiny = "factory?seed=5&units_train=2&units_test=2&life_cycles=40,60&degradation_cycles=20,30&test_rul_cycles=5,8"
    ckpt = tmp_path / "ckpt"
    assert (
        main(
            [
                "train",
                "--data",
                tiny,
                "--epochs",
                "1",
                "--quiet",
                "--threads",
                "1",
                "--window",
                "30",
                "--out",
                str(ckpt),
            ]
        )
        == 0
    )
    with pytest.raises(ConfigError, match="training windows for INT8 calibration"):
        compress_checkpoint(ckpt, tmp_path / "x", recipe=parse_recipe('[[pass]]\nkind = "quantize"\n'), progress=False)
