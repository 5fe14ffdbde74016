"""Shared by the torch-pass tests: a small simulated line, windowed once per module."""

from __future__ import annotations

import pytest

from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.training import Prepared, prepare

WINDOW = 16


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    return prepare(simulate_line(LineConfig(units_train=8, units_test=4), seed=0), window=WINDOW)
