"""The A/B slot store and its persisted install state machine (edgeglm.runtime.slots).

Runs in a runtime-only venv too: the bundles come from the ``runtime_fixtures`` fixture, built for
this machine's generic profile (see ``tests/runtime_fixtures.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from runtime_fixtures import host_profile

from edgeglm.bundle import Bundle
from edgeglm.errors import OtaError
from edgeglm.runtime.slots import TRANSITIONS, SlotEvent, SlotState, SlotStore, step

#: This machine's generic profile: the bundles are built for it, the stores are provisioned as it.
PROFILE = host_profile()


@pytest.fixture(scope="module")
def bundles(runtime_fixtures):
    """v1, v2, v3 (single files) and ``bad``: a v3 folder whose golden outputs are wrong but properly signed."""
    assert runtime_fixtures.profile == PROFILE
    return runtime_fixtures.bundles


def _store(tmp_path, signing_key) -> SlotStore:
    store = SlotStore(tmp_path / "root")
    store.provision(profile=PROFILE, trusted_key=signing_key[1].read_bytes())
    return store


def _assert_current_verifies(store: SlotStore, signing_key) -> Bundle:
    cur = store.current_bundle()
    assert cur is not None
    cur.verify(signing_key[1], device=PROFILE)
    return cur


def test_install_switch_and_noop(tmp_path, signing_key, bundles):
    store = _store(tmp_path, signing_key)
    r1 = store.install(bundles["1"])
    assert (r1.state, r1.slot, r1.changed) == (SlotState.COMMITTED, "a", True)
    assert r1.health["ok"] and r1.health["max_abs_error"] <= r1.health["tolerance"]
    again = store.install(bundles["1"])
    assert not again.changed and again.reason == "already installed and current"
    r2 = store.install(bundles["2"])
    assert (r2.state, r2.slot) == (SlotState.COMMITTED, "b")
    assert _assert_current_verifies(store, signing_key).manifest.version == "2"
    assert os.readlink(store.current_link) == "slots/b"


def test_downgrade_fails_before_touching_slots(tmp_path, signing_key, bundles):
    store = _store(tmp_path, signing_key)
    store.install(bundles["2"])
    before = sorted(p.name for p in (store.slots / "a").iterdir())
    r = store.install(bundles["1"])
    assert r.state is SlotState.FAILED and "downgrade refused" in r.reason
    assert store.current_bundle().manifest.version == "2"
    assert sorted(p.name for p in (store.slots / "a").iterdir()) == before


def test_failed_health_check_keeps_the_previous_model(tmp_path, signing_key, bundles):
    store = _store(tmp_path, signing_key)
    store.install(bundles["2"])
    r = store.install(bundles["bad"])
    assert r.state is SlotState.FAILED and r.reason.startswith("health check: golden outputs differ")
    assert _assert_current_verifies(store, signing_key).manifest.version == "2"
    assert not (store.slots / "b").exists()


def test_probation_then_rollback_or_commit(tmp_path, signing_key, bundles):
    store = _store(tmp_path, signing_key)
    store.install(bundles["1"])
    r = store.install(bundles["2"], commit=False)
    assert r.state is SlotState.PROBATION and store.current_slot() == "b"
    assert store.rollback("service did not come up") is SlotState.ROLLED_BACK
    assert store.current_bundle().manifest.version == "1"
    assert store.load_state()["reason"] == "service did not come up"
    store.install(bundles["2"], commit=False)
    assert store.commit() is SlotState.COMMITTED
    with pytest.raises(OtaError, match="nothing to roll back"):
        store.rollback()


def test_wrong_profile_or_other_key_cannot_reprovision(tmp_path, signing_key):
    store = _store(tmp_path, signing_key)
    from edgeglm.errors import ConfigError

    with pytest.raises(ConfigError, match=f"provisioned as '{PROFILE}'"):
        store.provision(profile="raspberry-pi-5")
    with pytest.raises(ConfigError, match="trusts another signing key"):
        store.provision(profile=PROFILE, trusted_key=b"other")


def test_transition_table_is_closed():
    assert step(SlotState.IDLE, SlotEvent.START) is SlotState.VERIFYING
    with pytest.raises(OtaError, match="no transition from committed on success"):
        step(SlotState.COMMITTED, SlotEvent.SUCCESS)
    reachable = {s for (_, _), s in TRANSITIONS.items()} | {SlotState.IDLE}
    assert reachable == set(SlotState)


_INSTALL = """
import sys
from edgeglm.runtime.slots import SlotStore
print(SlotStore(sys.argv[1]).install(sys.argv[2], commit=sys.argv[3] == "commit").state.value)
"""


@pytest.mark.parametrize("crash_at", ["verifying", "installing", "health_check", "switching", "probation"])
def test_kill_9_at_every_state_leaves_a_complete_verified_slot(tmp_path, signing_key, bundles, crash_at):
    """SIGKILL the installer right after each state is saved; recovery leaves v1 running, v2 installs next."""
    store = _store(tmp_path, signing_key)
    store.install(bundles["1"])
    env = {**os.environ, "EDGEGLM_CRASH_AT": crash_at}
    proc = subprocess.run(
        [sys.executable, "-c", _INSTALL, str(store.root), str(bundles["2"]), "commit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    assert store.load_state()["state"] == crash_at
    final = store.recover()
    assert final in (SlotState.FAILED, SlotState.ROLLED_BACK)
    assert f"interrupted during {crash_at}" in store.load_state()["reason"]
    assert _assert_current_verifies(store, signing_key).manifest.version == "1"
    assert store.recover() is final  # idempotent
    assert store.install(bundles["2"]).state is SlotState.COMMITTED
    assert _assert_current_verifies(store, signing_key).manifest.version == "2"


def test_kill_9_on_the_first_install_leaves_no_half_model(tmp_path, signing_key, bundles):
    store = _store(tmp_path, signing_key)
    env = {**os.environ, "EDGEGLM_CRASH_AT": "probation"}
    proc = subprocess.run(
        [sys.executable, "-c", _INSTALL, str(store.root), str(bundles["1"]), "commit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9
    assert store.recover() is SlotState.ROLLED_BACK
    assert store.current_bundle() is None
    assert store.install(bundles["1"]).state is SlotState.COMMITTED


def test_cli_install_status_rollback(tmp_path, signing_key, bundles, capsys):
    from edgeglm.cli import main

    root = tmp_path / "root"
    assert (
        main(
            [
                "edge",
                "install",
                str(bundles["1"]),
                "--root",
                str(root),
                "--provision",
                PROFILE,
                "--pubkey",
                str(signing_key[1]),
            ]
        )
        == 0
    )
    assert main(["edge", "install", str(bundles["2"]), "--root", str(root), "--no-commit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["state"] == "probation"
    assert main(["edge", "rollback", "--root", str(root)]) == 0
    assert main(["edge", "status", "--root", str(root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert st["current"]["version"] == "1" and st["state"] == "rolled_back"
    assert main(["edge", "install", str(bundles["bad"]), "--root", str(root)]) == 40
    assert "health check" in capsys.readouterr().err
    np.testing.assert_equal(st["device"]["profile"], PROFILE)
