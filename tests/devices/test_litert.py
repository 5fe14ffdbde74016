"""LiteRT bundles for real: litert-torch converts, ai-edge-litert runs, ONNX Runtime is the reference.

The tests marked ``litert`` need the extra (≈2.4 GB); ``make test-litert`` installs it into
``.venv-litert`` and runs ``pytest -m litert``. Without the extra they are skipped; the main venv
runs the precision choice on made-up measurements, and checks that a LiteRT-first build says how
to install the extra (tests/devices/test_build.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgeglm.devices.build import build_bundle
from edgeglm.devices.litert import (
    Candidate,
    LiteRTPrecision,
    choose_precision,
    convert_for_bundle,
    litert_available,
    litert_tolerance,
)
from edgeglm.devices.profile import load_profile
from edgeglm.errors import ConfigError

needs_litert = pytest.mark.skipif(
    not litert_available(),
    reason="the litert extra (litert-torch, ai-edge-litert) is not installed: `make test-litert` runs these",
)

PI4 = "raspberry-pi-4"  # backends = ["litert", "onnxruntime"]: LiteRT first
CREATED = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def bundle(compressed_dir, signing_key):
    return build_bundle(compressed_dir, load_profile(PI4), signing_key[0], version="1", created=CREATED)


@pytest.fixture(scope="module")
def golden(bundle):
    """(inputs, reference outputs) as recorded in the manifest."""
    return bundle.manifest.golden()


def _ort(onnx_bytes: bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0].reshape(-1)


def _litert(tflite: bytes, x: np.ndarray, tmp_path) -> np.ndarray:
    from edgeglm.runtime.backends.litert import LiteRTBackend

    path = tmp_path / "model.tflite"
    path.write_bytes(tflite)
    backend = LiteRTBackend(path, threads=1)
    assert backend.provider == "ai_edge_litert"
    try:
        return backend.run_one(x).reshape(-1)
    finally:
        backend.close()


@pytest.mark.litert
@needs_litert
def test_litert_first_profile_builds_model_tflite(bundle):
    m = bundle.manifest
    assert m.backends == ("litert", "onnxruntime") and m.model_file("litert") == "model.tflite"
    tflite = bundle.files["model.tflite"]
    assert tflite[4:8] == b"TFL3"  # the flatbuffer file identifier
    entry = m.data["files"]["model.tflite"]
    assert entry["precision"] in {p.value for p in LiteRTPrecision}
    assert entry["size"] == len(tflite) and entry["converter"].startswith("litert-torch ")
    errors, q = entry["golden_max_abs_error"], entry["quantization_error"]
    assert set(errors) == {"fp32", "int8"}  # the fixture is INT8: both were converted and measured
    assert q["windows"] == 8 + 128  # the golden windows and the held-out half of the 256 calibration windows
    assert q["fp32"] < 1e-3 * q["reference"]  # the float model is the torch model
    # INT8 is shipped exactly when it was accurate, and the tolerance covers what was measured
    assert (entry["precision"] == "int8") == (q["int8"] <= max(entry["int8_budget"], q["reference"]))
    assert errors[entry["precision"]] < m.golden_tolerance("litert")
    assert any(n.startswith(f"model.tflite is {entry['precision']}: INT8 error vs the float") for n in m.data["notes"])
    assert m.files["model.onnx"].backends == ("onnxruntime",)  # also the reference of the golden outputs


@pytest.mark.litert
@needs_litert
def test_tflite_matches_onnxruntime_on_the_golden_inputs(bundle, golden, tmp_path):
    inputs, _ = golden
    ref = _ort(bundle.files["model.onnx"], inputs)  # ONNX Runtime again, not the recorded outputs
    got = _litert(bundle.files["model.tflite"], next(iter(inputs.values())), tmp_path)
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    entry = bundle.manifest.data["files"]["model.tflite"]
    assert err <= bundle.manifest.golden_tolerance("litert")
    assert err == pytest.approx(entry["golden_max_abs_error"][entry["precision"]], abs=1e-6)


@pytest.mark.litert
@needs_litert
def test_engine_opens_the_litert_model_and_passes_its_health_check(bundle, golden, signing_key, tmp_path):
    from edgeglm.runtime.engine import Engine

    engine = Engine.open(bundle.write(tmp_path / "b.eglm"), public_key=signing_key[1], backend="litert", arch=None)
    try:
        assert engine.backend_name == "litert"
        report = engine.health_check(runs=5)
        assert report.ok, report.reason
        x = next(iter(golden[0].values()))
        assert engine.infer(x[:3]).shape == (3,)  # a batch the static-batch model runs in slices
    finally:
        engine.close()


@pytest.mark.litert
@needs_litert
def test_float_only_for_a_float_model(compressed_dir, golden):
    inputs, outputs = golden
    conversion = convert_for_bundle(compressed_dir, inputs, outputs, int8=False)
    assert conversion.precision == "fp32" and [c.precision for c in conversion.candidates] == [LiteRTPrecision.FP32]
    assert conversion.tolerance >= 2 * conversion.chosen.golden_error


@pytest.mark.litert
@needs_litert
def test_compressed_folder_without_torch_model_says_to_recompress(compressed_dir, golden, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(compressed_dir, old, ignore=shutil.ignore_patterns("torch_model", "stages"))
    with pytest.raises(ConfigError, match="no torch_model/") as err:
        convert_for_bundle(old, *golden)
    assert "re-run 'edgeglm compress'" in err.value.hint


# -- the choice, on made-up measurements (no extra needed) ------------------------------------


def _candidate(precision: str, quantization_error: float, golden_error: float = 1.0, step: float = 0.0) -> Candidate:
    return Candidate(LiteRTPrecision(precision), b"tflite", golden_error, quantization_error, step, 1.0)


@pytest.mark.parametrize(
    ("int8", "reference", "budget", "shipped"),
    [
        (0.90, 2.00, 1.06, "int8"),  # within the budget and the reference's own error
        (8.38, 9.51, 1.26, "int8"),  # over the budget, as accurate as the ONNX INT8 model (simulator STGNN)
        (1.50, 0.40, 1.26, "fp32"),  # over both: INT8 is not accurate
        (1.26, 0.00, 1.26, "int8"),  # exactly at the budget
    ],
)
def test_int8_ships_when_as_accurate_as_the_reference(int8, reference, budget, shipped):
    candidates = [_candidate("fp32", 1e-5), _candidate("int8", int8, step=0.5)]
    chosen, notes = choose_precision(candidates, int8_budget=budget, reference_error=reference)
    assert chosen.precision.value == shipped
    assert bool(notes) == (shipped == "fp32")
    if notes:
        assert "float shipped" in notes[0] and f"{int8:.4g}" in notes[0]


def test_float_alone_ships_float_and_float_is_required():
    fp = _candidate("fp32", 1e-5)
    assert choose_precision([fp], int8_budget=1.0, reference_error=0.5) == (fp, ())
    with pytest.raises(ValueError, match="float candidate"):
        choose_precision([_candidate("int8", 0.3)], int8_budget=1.0, reference_error=0.5)


def test_tolerance_is_twice_the_golden_error_plus_quantization_steps_or_a_float_floor():
    assert litert_tolerance(_candidate("int8", 1.0, 0.75, 0.6), scale=105.0) == pytest.approx(2 * 0.75 + 2 * 0.6)
    assert litert_tolerance(_candidate("fp32", 0.0, 0.79), scale=105.0) == pytest.approx(2 * 0.79 + 1e-4 * 105.0)
