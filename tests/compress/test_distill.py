"""Distillation: the student tracks the teacher better than the same student trained from scratch."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeglm.compress.distill import DistillConfig, Student, alpha_at
from edgeglm.compress.passes import PassContext, PassResult, Stage, config_from_table, run_pass
from edgeglm.errors import ConfigError
from edgeglm.metrics import rmse
from edgeglm.models import STGNN, MLPStudent, STGNNConfig, build_model, count_parameters
from edgeglm.training import Prepared, TrainConfig, fit, predict

WINDOW = 16


@pytest.fixture(scope="module")
def teacher(prepared: Prepared) -> nn.Module:
    torch.manual_seed(0)
    cfg = STGNNConfig(num_nodes=prepared.spec.num_sensors, window=WINDOW, channels=8, blocks=2, head_hidden=32)
    model = build_model(cfg, prepared.graph.normalized())
    fit(model, prepared.train, prepared.val, TrainConfig(epochs=4, batch_size=64, lr=3e-3, threads=1), progress=False)
    return model.eval()


def _ctx(prepared: Prepared, teacher: nn.Module, workdir: Path) -> PassContext:
    return PassContext(prepared=prepared, teacher=teacher, workdir=workdir, progress=False, threads=1)


@pytest.fixture(scope="module")
def mlp_result(prepared: Prepared, teacher: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> PassResult:
    cfg = DistillConfig(student=Student.MLP, hidden=(64,), epochs=20, batch_size=32, alpha_start=1.0, alpha_end=0.3)
    ctx = _ctx(prepared, teacher, tmp_path_factory.mktemp("distill"))
    return run_pass(Stage("teacher", torch_model=teacher, architecture="stgnn"), cfg, ctx)


def test_distilled_mlp_tracks_the_teacher_better_than_scratch(
    mlp_result: PassResult, prepared: Prepared, teacher: nn.Module
) -> None:
    student = mlp_result.stage.torch_model
    assert isinstance(student, MLPStudent) and mlp_result.stage.architecture == "mlp"
    teacher_val = predict(teacher, prepared.val.x)
    distilled_gap = rmse(predict(student, prepared.val.x), teacher_val)
    rec = mlp_result.record
    assert distilled_gap == pytest.approx(rec["distilled"]["val_rmse_vs_teacher"])
    assert distilled_gap < 0.85 * rec["scratch"]["val_rmse_vs_teacher"]


def test_record_puts_distilled_next_to_scratch(mlp_result: PassResult, teacher: nn.Module) -> None:
    rec = mlp_result.record
    for run in ("distilled", "scratch"):
        for key in ("val_rmse", "test_rmse", "val_rmse_vs_teacher", "epochs_run"):
            assert math.isfinite(rec[run][key]), (run, key)
    assert rec["distilled"]["val_rmse"] != rec["scratch"]["val_rmse"]  # two different trainings
    assert rec["params_teacher"] == count_parameters(teacher)
    assert list(rec["student_config"]["hidden"]) == [64]
    # the teacher was used frozen, not trained
    assert all(p.requires_grad for p in teacher.parameters())


def test_stgnn_student_with_hint_loss(prepared: Prepared, teacher: nn.Module, tmp_path: Path) -> None:
    cfg = DistillConfig(student="stgnn-small", channels=4, blocks=1, epochs=1, batch_size=64, hint_weight=1.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = run_pass(Stage("teacher", torch_model=teacher), cfg, _ctx(prepared, teacher, tmp_path))
    student = result.stage.torch_model
    assert isinstance(student, STGNN) and student.config.channels == 4
    assert not any("projection" in k for k in student.state_dict())  # the hint projection is dropped
    assert count_parameters(student) < count_parameters(teacher)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert result.record["schedule"]["hint_weight"] == 1.0


def test_alpha_schedule_starts_soft_and_ends_on_the_task() -> None:
    steps = 100
    alphas = [alpha_at(t, steps, 0.9, 0.1) for t in range(steps + 1)]
    assert alphas[0] == pytest.approx(0.9)
    assert alphas[-1] == pytest.approx(0.1)
    assert alphas[50] == pytest.approx(0.5)  # cosine: halfway at the midpoint
    assert all(a >= b for a, b in itertools.pairwise(alphas))
    assert alpha_at(150, steps, 0.9, 0.1) == pytest.approx(0.1)


# -- configuration -----------------------------------------------------------------------------


def test_config_from_recipe_table() -> None:
    cfg = config_from_table("distill", {"student": "stgnn-small", "channels": 6, "epochs": 5})
    assert isinstance(cfg, DistillConfig) and cfg.student is Student.STGNN_SMALL
    assert cfg.to_dict()["student"] == "stgnn-small"


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"student": "gpt"}, "valid: 'stgnn-small', 'mlp'"),
        ({"student": "mlp", "channels": 8}, "mlp student"),
        ({"student": "stgnn-small", "hidden": (32,)}, "stgnn-small student"),
        ({"alpha_start": 0.2, "alpha_end": 0.5}, "alpha_end ≤ alpha_start"),
        ({"hint_weight": -1.0}, "hint_weight"),
        ({"epochs": 0}, "epochs must be"),
    ],
)
def test_bad_config_is_an_error(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**fields)


def test_onnx_stage_must_come_after(prepared: Prepared, teacher: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="before export"):
        run_pass(Stage("fp32", onnx_path=tmp_path / "m.onnx"), DistillConfig(), _ctx(prepared, teacher, tmp_path))
