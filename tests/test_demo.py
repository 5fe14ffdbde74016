"""`edgeglm demo --quick`: the main job runs from nothing on the embedded simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeglm.checkpoint import load_checkpoint
from edgeglm.cli import main


@pytest.mark.slow
def test_quick_demo_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "STGNN teacher" in out and "test RMSE" in out and "predicting the mean RUL gives RMSE" in out
    ckpt = load_checkpoint(tmp_path / "teacher")
    assert ckpt.source.startswith("factory?seed=0&units_train=16")
    assert ckpt.metrics["test_units"] == 6
