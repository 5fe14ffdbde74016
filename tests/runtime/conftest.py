"""Runtime test fixtures: a real Mosquitto broker per test."""

from __future__ import annotations

from pathlib import Path

import pytest
from brokers import Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    yield broker
    broker.stop()
