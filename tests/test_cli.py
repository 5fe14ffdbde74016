"""The `edgeglm` CLI: train → evaluate on a small simulated line, errors with hints, help that teaches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeglm.checkpoint import CHECKPOINT_FILES, load_checkpoint
from edgeglm.cli import main

SMALL = "factory?seed=3&units_train=12&units_test=5"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "teacher"
    rc = main(["train", "--data", SMALL, "--epochs", "2", "--quiet", "--threads", "1", "--out", str(out)])
    assert rc == 0
    return out


def test_train_writes_a_complete_checkpoint(checkpoint: Path) -> None:
    for name in CHECKPOINT_FILES:
        assert (checkpoint / name).is_file(), name
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.source == SMALL
    assert ckpt.model_config.kind == "stgnn"
    assert ckpt.window_spec.num_sensors == ckpt.graph.num_nodes == ckpt.model_config.num_nodes
    assert ckpt.graph.num_edges > 0  # the simulator's ground-truth graph, not the identity
    assert len(ckpt.metrics["history"]) == 2
    assert set(ckpt.data["val_units"]) <= set(range(1, 13))


def test_evaluate_reproduces_the_training_test_metric(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["units"] == 5
    want = load_checkpoint(checkpoint).metrics["test_rmse"]
    assert abs(out["rmse"] - want) < 1e-4


def test_errors_print_a_hint_and_exit_with_the_class_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(tmp_path / "nope")]) == 4
    err = capsys.readouterr().err
    assert "does not exist" in err and "hint: train one" in err
    assert main(["train", "--data", "parquet:/x", "--epochs", "1"]) == 2
    assert "unknown kind 'parquet'" in capsys.readouterr().err
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model.json").write_text("{}")
    assert main(["evaluate", str(tmp_path / "partial")]) == 4
    assert "incomplete: missing weights.pt" in capsys.readouterr().err


def test_help_lists_real_commands_with_examples() -> None:
    out = subprocess.run([sys.executable, "-m", "edgeglm.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "evaluate", "compress", "simulate", "demo"):
        assert cmd in out.stdout
    sub = subprocess.run([sys.executable, "-m", "edgeglm.cli", "train", "--help"], capture_output=True, text=True)
    assert "example: edgeglm train" in sub.stdout


def test_simulate_writes_cmapss_format_files(tmp_path: Path) -> None:
    import numpy as np

    from edgeglm.data.factory import LineConfig, simulate_line

    assert main(["simulate", "--out", str(tmp_path), "--seed", "1"]) == 0
    cols = json.loads((tmp_path / "columns.json").read_text())["columns"]
    text = (tmp_path / "train_factory.txt").read_text().splitlines()
    assert len(text[0].split()) == len(cols)
    rul = (tmp_path / "RUL_factory.txt").read_text().split()
    assert all(int(r) > 0 for r in rul)
    table = np.loadtxt(tmp_path / "train_factory.txt")
    want = simulate_line(LineConfig(), seed=1).train
    np.testing.assert_array_equal(table[:, 0], want.unit)
    np.testing.assert_array_equal(table[:, 1], want.cycle)
    assert len(rul) == len(simulate_line(LineConfig(), seed=1).test.units)
