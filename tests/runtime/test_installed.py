"""What a device start checks on its installed model (SlotStore.open_current / Engine.open_installed)."""

from __future__ import annotations

import json

import pytest

from edgeglm.cli import main
from edgeglm.errors import HashMismatch, OtaError
from edgeglm.runtime.engine import Engine
from edgeglm.runtime.slots import SlotStore


@pytest.fixture
def device(runtime_fixtures, tmp_path):
    store = SlotStore(tmp_path / "root")
    store.provision(profile=runtime_fixtures.profile, trusted_key=runtime_fixtures.public_key.read_bytes())
    return store


def test_installed_model_opens_without_the_signature_library(device, runtime_fixtures):
    with pytest.raises(OtaError, match="runs no model yet"):
        device.open_current()
    assert device.install(runtime_fixtures.bundles["1"]).changed
    with Engine.open_installed(device.root) as eng:
        assert eng.manifest.version == "1" and eng.verify_report is None
        assert eng.health_check(runs=3, budget_ms=1e9).ok


def test_a_slot_changed_outside_install_is_refused(device, runtime_fixtures):
    device.install(runtime_fixtures.bundles["1"])
    slot = device.slots / device.current_slot()
    model = slot / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-20] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=r"model\.onnx sha256"):
        Engine.open_installed(device.root)
    model.write_bytes(bytes(data[:-1]))
    with pytest.raises(HashMismatch, match="truncated or altered"):
        device.open_current()
    # a whole other (validly signed) bundle copied into the slot by hand is not the committed one
    for p in slot.iterdir():
        p.unlink()
    from edgeglm.bundle import Bundle

    Bundle.open(runtime_fixtures.bundles["2"]).extract(slot)
    with pytest.raises(HashMismatch, match="changed outside 'edgeglm edge install'"):
        device.open_current()


def test_edge_predict_runs_the_installed_model(device, runtime_fixtures, tmp_path, capsys, monkeypatch):
    import io

    device.install(runtime_fixtures.bundles["2"])
    with Engine.open_installed(device.root) as eng:
        spec = eng.manifest.window_spec
    rows = [
        json.dumps(
            {
                "stream": "m1",
                "t": t,
                **{s: 1.0 for s in spec["setting_names"]},
                **{s: 0.1 for s in spec["sensor_names"]},
            }
        )
        for t in range(1, spec["window"] + 3)
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(rows) + "\n"))
    assert main(["edge", "predict", "--root", str(device.root), "--stdin"]) == 0
    out = capsys.readouterr()
    assert len([x for x in out.out.splitlines() if '"prediction"' in x]) == 3
