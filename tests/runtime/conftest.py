"""Runtime test fixtures: a real Mosquitto broker per test; a device root running bundle v1."""

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


@pytest.fixture
def device(runtime_fixtures, tmp_path: Path) -> Path:
    """A provisioned device root (this machine's generic profile) with bundle v1 installed and committed."""
    from edgeglm.runtime.slots import SlotStore

    store = SlotStore(tmp_path / "root")
    store.provision(profile=runtime_fixtures.profile, trusted_key=runtime_fixtures.public_key.read_bytes())
    assert store.install(runtime_fixtures.bundles["1"]).changed
    return store.root
