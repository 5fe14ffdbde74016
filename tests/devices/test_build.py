"""Building, reading and verifying bundles (edgeglm.devices.build, edgeglm.bundle)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest
import zstandard

from edgeglm.bundle import Bundle, Manifest, canonical_json, decode_array, encode_array
from edgeglm.cli import main
from edgeglm.devices.build import AlarmThresholds, build_bundle
from edgeglm.devices.profile import load_profile
from edgeglm.errors import (
    BundleError,
    ConfigError,
    DeviceMismatch,
    DowngradeError,
    HashMismatch,
    ManifestError,
    SignatureError,
)
from edgeglm.runtime.backends.trt import read_trt_settings
from edgeglm.signing import generate_keypair, load_private_key, sign

X86 = "generic-x86_64"
CREATED = "2026-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def bundle(compressed_dir, signing_key) -> Bundle:
    return build_bundle(
        compressed_dir, load_profile(X86), signing_key[0], version="3", created=CREATED, backends=("onnxruntime",)
    )


def test_manifest_holds_what_a_device_needs(bundle, compressed_dir):
    m = bundle.manifest
    assert (m.name, m.version, m.sequence, m.precision) == ("checkpoint", "3", 3, "int8")
    assert (m.profile, m.arch, m.backends) == (X86, "x86_64", ("onnxruntime",))
    assert m.inputs[0].name == "window" and m.inputs[0].shape == ("batch", 16, 19)
    assert m.files["model.onnx"].size == len((compressed_dir / "model.onnx").read_bytes())
    assert m.window_spec == json.loads((compressed_dir / "window_spec.json").read_text())
    assert m.graph == json.loads((compressed_dir / "graph.json").read_text())
    assert m.thresholds == AlarmThresholds().to_dict()
    golden_in, golden_out = m.golden()
    np.testing.assert_array_equal(golden_in["window"], np.load(compressed_dir / "golden_windows.npy"))
    assert golden_out["rul"].shape[0] == 8 and np.all(np.isfinite(golden_out["rul"]))
    assert m.data["created"] == CREATED and m.data["toolkit"]["name"] == "edgeglm"
    assert bundle.manifest_bytes == canonical_json(m.data)


def test_file_and_folder_forms_verify_and_hold_the_same_bytes(bundle, signing_key, tmp_path):
    one = Bundle.open(bundle.write(tmp_path / "m.eglm"))
    folder = Bundle.open(bundle.write(tmp_path / "m"))
    assert one.members() == folder.members() == bundle.members()
    report = one.verify(signing_key[1], device=X86, arch="x86_64", installed_sequence=3)
    assert [c for c, _ in report.checks] == ["format", "signature", "files", "device", "arch", "sequence"]
    with tarfile.open(
        fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompress((tmp_path / "m.eglm").read_bytes())), mode="r:"
    ) as tar:
        assert [i.name for i in tar] == ["manifest.json", "signature", "model.onnx"]
        assert {i.mtime for i in tar} == {0}


def test_bundle_is_reproducible_except_creation_time(compressed_dir, signing_key, tmp_path):
    a = build_bundle(compressed_dir, load_profile(X86), signing_key[0], backends=("onnxruntime",), created=CREATED)
    b = build_bundle(compressed_dir, load_profile(X86), signing_key[0], backends=("onnxruntime",), created=CREATED)
    c = build_bundle(
        compressed_dir, load_profile(X86), signing_key[0], backends=("onnxruntime",), created="2027-01-01T00:00:00Z"
    )
    assert a.write(tmp_path / "a.eglm").read_bytes() == b.write(tmp_path / "b.eglm").read_bytes()
    assert a.files == c.files
    da, dc = dict(a.manifest.data), dict(c.manifest.data)
    assert da.pop("created") != dc.pop("created") and da == dc


def test_truncated_archive_is_refused_at_every_length(bundle, tmp_path):
    raw = bundle.to_archive_bytes()
    for cut in sorted({0, 1, 4, 16, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 5, len(raw) - 1}):
        p = tmp_path / f"cut{cut}.eglm"
        p.write_bytes(raw[:cut])
        with pytest.raises(BundleError, match=r"truncated or corrupt|not a valid bundle archive|missing"):
            Bundle.open(p)


def test_bit_flips_in_the_archive_never_give_a_verified_bundle(bundle, signing_key, tmp_path):
    raw = bytearray(bundle.to_archive_bytes())
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(raw), size=25):
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        p = tmp_path / "flip.eglm"
        p.write_bytes(bytes(flipped))
        with pytest.raises(BundleError):
            Bundle.open(p).verify(signing_key[1])


def test_tampered_model_file_names_the_file(bundle, signing_key, tmp_path):
    folder = bundle.write(tmp_path / "b")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=r"model.onnx sha256 .* the file was altered"):
        Bundle.open(folder).verify(signing_key[1])
    (folder / "model.onnx").write_bytes(bytes(data[:-10]))
    with pytest.raises(HashMismatch, match=r"model.onnx is .* bytes, the manifest says"):
        Bundle.open(folder).verify(signing_key[1])
    (folder / "model.onnx").unlink()
    with pytest.raises(HashMismatch, match="missing"):
        Bundle.open(folder).verify(signing_key[1])


def test_unsigned_extra_file_is_refused(bundle, signing_key, tmp_path):
    folder = bundle.write(tmp_path / "b")
    (folder / "evil.so").write_bytes(b"x")
    with pytest.raises(HashMismatch, match=r"not covered by the signature: evil.so"):
        Bundle.open(folder).verify(signing_key[1])


def test_edited_manifest_or_other_signer_fails_the_signature(bundle, signing_key, tmp_path):
    folder = bundle.write(tmp_path / "b")
    doc = json.loads((folder / "manifest.json").read_text())
    doc["thresholds"]["rul_low"] = 0.0  # silence the alarm
    (folder / "manifest.json").write_bytes(canonical_json(doc))
    with pytest.raises(SignatureError, match=r"does not match manifest.json"):
        Bundle.open(folder).verify(signing_key[1])
    other, _ = generate_keypair(tmp_path / "other.key")
    (folder / "signature").write_bytes(sign(canonical_json(doc), load_private_key(other)).to_bytes())
    with pytest.raises(SignatureError, match="but the trusted key is"):
        Bundle.open(folder).verify(signing_key[1])
    (folder / "signature").unlink()
    with pytest.raises(BundleError, match="unsigned"):
        Bundle.open(folder)


def test_wrong_device_arch_and_downgrade_are_refused_exactly(bundle, signing_key):
    with pytest.raises(DeviceMismatch, match="built for device profile 'generic-x86_64', this device is 'raspberry"):
        bundle.verify(signing_key[1], device="raspberry-pi-5")
    with pytest.raises(DeviceMismatch, match="bundle is for x86_64, this device is aarch64"):
        bundle.verify(signing_key[1], arch="aarch64")
    with pytest.raises(DowngradeError, match="sequence 3 is older than the installed 4"):
        bundle.verify(signing_key[1], installed_sequence=4)


def test_other_format_versions_are_refused_with_direction():
    doc = {"format": "edgeglm-bundle", "format_version": 2}
    with pytest.raises(ManifestError, match="upgrade edgeglm"):
        Manifest.from_bytes(canonical_json(doc))
    with pytest.raises(ManifestError, match="not an EdgeGLM bundle"):
        Manifest.from_bytes(b'{"format": "other"}')
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_bytes(b"\xff")


def test_arrays_round_trip_exactly():
    a = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(encode_array(a)))), a)


def test_jetson_bundle_ships_qdq_onnx_and_trt_settings_never_an_engine(compressed_dir, signing_key):
    b = build_bundle(compressed_dir, load_profile("jetson-orin-nano-8gb"), signing_key[0], created=CREATED)
    assert set(b.files) == {"model.onnx", "trt.toml"}
    assert b.manifest.model_file("tensorrt") == "model.onnx"
    assert b.manifest.files["trt.toml"].role == "engine-config"
    settings_path = compressed_dir.parent / "trt.toml"
    settings_path.write_bytes(b.files["trt.toml"])
    s = read_trt_settings(settings_path)
    assert s.precision == "int8" and s.dla_core == -1 and s.workspace_mb > 0
    assert "engine" not in " ".join(b.files) and "calib" not in " ".join(b.files)


def test_build_errors_say_what_to_do(compressed_dir, signing_key, tmp_path):
    x86 = load_profile(X86)
    with pytest.raises(ConfigError, match="--sequence is needed"):
        build_bundle(compressed_dir, x86, signing_key[0], version="2026.11-a", backends=("onnxruntime",))
    with pytest.raises(ConfigError, match="not among generic-x86_64's"):
        build_bundle(compressed_dir, x86, signing_key[0], backends=("tensorrt",))
    with pytest.raises(ConfigError, match="not a compressed model folder: missing"):
        build_bundle(tmp_path, x86, signing_key[0])
    with pytest.raises(ConfigError, match="rul_clear"):
        AlarmThresholds(rul_low=30, rul_clear=20)


@pytest.mark.skipif(importlib.util.find_spec("litert_torch") is not None, reason="the litert extra is installed")
@pytest.mark.parametrize(
    ("profile", "backends"),
    [("raspberry-pi-4", None), ("raspberry-pi-5", ("litert",))],  # LiteRT first by profile / by choice
)
def test_litert_profile_without_the_extra_says_how_to_install(compressed_dir, signing_key, profile, backends):
    with pytest.raises(ConfigError, match=r"litert-torch .* not installed") as err:
        build_bundle(compressed_dir, load_profile(profile), signing_key[0], backends=backends)
    assert "pip install 'edgeglm[litert]'" in err.value.hint and "--backends onnxruntime" in err.value.hint


def test_cli_keygen_build_inspect_verify(compressed_dir, tmp_path, capsys):
    key = tmp_path / "fleet.key"
    assert main(["keygen", "--out", str(key)]) == 0
    out = tmp_path / "m.eglm"
    assert (
        main(
            [
                "build",
                str(compressed_dir),
                "--device",
                X86,
                "--backends",
                "onnxruntime",
                "--key",
                str(key),
                "--version",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["inspect", str(out)]) == 0
    assert "sequence 5" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["model"]["sequence"] == 5
    assert main(["verify", str(out), "--pubkey", f"{key}.pub", "--device", X86]) == 0
    assert "ok  signature" in capsys.readouterr().out
    assert main(["verify", str(out), "--pubkey", f"{key}.pub", "--device", "jetson-orin-nano-8gb"]) == 14
    assert main(["verify", str(out), "--pubkey", f"{key}.pub", "--installed-sequence", "6"]) == 15
    err = capsys.readouterr().err
    assert "downgrade refused" in err and "hint:" in err
