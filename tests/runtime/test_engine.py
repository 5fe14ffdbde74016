"""The engine (verify + backend + health check) and backend selection (edgeglm.runtime).

Runs in a runtime-only venv too: the bundles come from the ``runtime_fixtures`` fixture, built for
this machine's generic profile (see ``tests/runtime_fixtures.py``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import pytest

from edgeglm.devices.profile import load_profile
from edgeglm.errors import BackendUnavailable, ConfigError, DeviceMismatch
from edgeglm.runtime.backends.base import available_backends, select_backend
from edgeglm.runtime.backends.trt import TrtSettings, engine_cache_key, read_trt_settings
from edgeglm.runtime.engine import Engine

#: The architecture a bundle for this machine is *not* for.
FOREIGN_ARCH = "x86_64" if platform.machine() in ("aarch64", "arm64") else "aarch64"


@pytest.fixture(scope="module")
def bundle_file(runtime_fixtures):
    """A single-file v1 bundle for this machine's generic profile (ONNX Runtime only)."""
    return runtime_fixtures.bundles["1"]


@pytest.fixture(scope="module")
def device(runtime_fixtures) -> str:
    return runtime_fixtures.profile


def test_engine_reproduces_the_golden_outputs(bundle_file, signing_key, device):
    with Engine.open(bundle_file, public_key=signing_key[1], device=device) as eng:
        assert eng.backend_name == "onnxruntime" and eng.threads == load_profile(device).threads
        assert eng.manifest.profile == device and eng.manifest.arch == platform.machine()
        inputs, outputs = eng.manifest.golden()
        got = eng.infer(inputs["window"])
        np.testing.assert_allclose(got, outputs["rul"].reshape(-1), atol=1e-5)
        report = eng.health_check(runs=5)
        assert report.ok and report.max_abs_error <= report.tolerance
        failing = eng.health_check(runs=5, budget_ms=0.0)
        assert not failing.ok and "exceeds the device budget" in failing.reason
        tmp = eng.model_dir
    assert not tmp.exists()  # the single-file bundle was extracted to a temp dir, removed on close


def test_engine_refuses_unverified_or_foreign_bundles(bundle_file, signing_key):
    with pytest.raises(ConfigError, match="trusted public key is needed"):
        Engine.open(bundle_file)
    with pytest.raises(DeviceMismatch, match="this device is 'raspberry-pi-5'"):
        Engine.open(bundle_file, public_key=signing_key[1], device="raspberry-pi-5")
    with pytest.raises(DeviceMismatch, match=f"this device is {FOREIGN_ARCH}"):
        Engine.open(bundle_file, public_key=signing_key[1], arch=FOREIGN_ARCH)


def test_unavailable_backend_lists_what_is_there():
    assert "onnxruntime" in available_backends()
    assert select_backend(("tensorrt", "onnxruntime")) in ("tensorrt", "onnxruntime")
    if "tensorrt" not in available_backends():
        with pytest.raises(BackendUnavailable, match=r"backend 'tensorrt' is not installed here \(available: onnx"):
            select_backend(("tensorrt", "onnxruntime"), requested="tensorrt")
    with pytest.raises(BackendUnavailable, match="the bundle has no model for backend 'litert'"):
        select_backend(("onnxruntime",), requested="litert")
    with pytest.raises(BackendUnavailable, match="unknown backend 'cuda'"):
        select_backend(("onnxruntime",), requested="cuda")


def test_trt_settings_and_engine_cache_key(tmp_path):
    p = tmp_path / "trt.toml"
    p.write_text('schema_version = 1\nprecision = "fp16"\nworkspace_mb = 256\ndla_core = 0\n')
    s = read_trt_settings(p)
    assert s == TrtSettings(precision="fp16", workspace_mb=256, dla_core=0)
    p.write_text("precison = 'int8'\n")
    with pytest.raises(ConfigError, match="unknown keys precison"):
        read_trt_settings(p)
    base = {"trt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "model": b"m", "settings": b"s"}
    key = engine_cache_key(**base)
    for field, value in [
        ("trt_version", "10.4.0"),
        ("gpu", "Xavier"),
        ("compute_capability", "7.2"),
        ("model", b"m2"),
        ("settings", b"s2"),
    ]:
        assert engine_cache_key(**{**base, field: value}) != key
    assert engine_cache_key(**base) == key


def test_runtime_never_imports_torch(bundle_file, signing_key):
    code = f"""
import sys, json
from edgeglm.runtime.engine import Engine
from edgeglm.runtime.slots import SlotStore
import edgeglm.cli
with Engine.open({str(bundle_file)!r}, public_key={str(signing_key[1])!r}) as e:
    inputs, _ = e.manifest.golden()
    y = e.infer(inputs["window"])
print(json.dumps({{"torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules, "n": len(y)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc == {"torch": False, "onnx": False, "n": 8}
