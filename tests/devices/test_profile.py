"""Device profiles: the shipped TOML files load, user folders add and override, bad files say what is wrong."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgeglm.devices
from edgeglm.cli import main
from edgeglm.devices import (
    BACKENDS,
    PRECISIONS,
    SHIPPED_DIR,
    Accelerator,
    DeviceProfile,
    list_profiles,
    load_profile,
    parse_profile,
    profile_dirs,
)
from edgeglm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "jetson-xavier-nx",
    "raspberry-pi-5",
    "raspberry-pi-4",
    "generic-arm64",
    "generic-x86_64",
}
SHIPPED = sorted(SHIPPED_DIR.glob("*.toml"))

# A minimal valid profile; the bad-file tests each break one thing in it.
VALID = """\
schema_version = 1

[device]
name = "press-07"
description = "test gateway"
arch = "aarch64"
cpu = "4-core Arm"
cpu_cores = 4
memory_mb = 2048
os = "Debian 12"
python = "3.11"
backends = ["onnxruntime"]
precisions = ["int8", "fp32"]
threads = 2
latency_budget_ms = 20.0
"""

JETSON = """\
schema_version = 1

[device]
name = "my-orin"
description = "test Jetson"
arch = "aarch64"
cpu = "6-core Arm"
cpu_cores = 6
memory_mb = 8192
os = "Ubuntu 22.04"
jetpack = "6.2"
tensorrt = "10.3"
python = "3.10"
backends = ["tensorrt", "onnxruntime"]
precisions = ["int8", "fp16"]
threads = 4
latency_budget_ms = 5
trt_workspace_mb = 512

[accelerator]
kind = "gpu"
name = "test GPU"
compute_capability = "8.7"
"""


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's own EDGEGLM_DEVICES must not leak into these tests."""
    monkeypatch.delenv("EDGEGLM_DEVICES", raising=False)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


# --- shipped profiles --------------------------------------------------------------------------


def test_the_required_devices_are_shipped() -> None:
    assert {p.stem for p in SHIPPED} == REQUIRED
    assert [p.name for p in list_profiles()] == sorted(REQUIRED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_loads_validates_and_round_trips(path: Path) -> None:
    profile = load_profile(path.stem)
    assert profile.name == path.stem
    assert profile.source == path
    assert load_profile(path) == profile
    assert set(profile.backends) <= set(BACKENDS) and set(profile.precisions) <= set(PRECISIONS)
    assert 1 <= profile.threads <= profile.cpu_cores
    text = path.read_text()
    assert "https://" in text or "No vendor source" in text, "cite the vendor source in a comment"
    # to_dict is JSON-able, leaves out source, and parses back to the same profile
    data = json.loads(json.dumps(profile.to_dict()))
    assert "source" not in data
    accel = data.pop("accelerator")
    doc = {"schema_version": 1, "device": {k: v for k, v in data.items() if v is not None}}
    if accel is not None:
        doc["accelerator"] = accel
    assert parse_profile(doc, name=profile.name, source=None) == dataclasses.replace(profile, source=None)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_jetson_profiles_carry_their_gpu_and_software_stack(path: Path) -> None:
    profile = load_profile(path)
    if path.stem.startswith("jetson-"):
        assert profile.is_jetson and profile.backends[0] == "tensorrt"
        assert profile.accelerator is not None and profile.accelerator.kind == "gpu"
        assert profile.jetpack and profile.tensorrt and profile.trt_workspace_mb
        assert profile.arch == "aarch64"
    else:
        assert not profile.is_jetson
        assert profile.accelerator is None and profile.jetpack is None and profile.trt_workspace_mb is None


def test_shipped_figures_match_the_vendor_specifications() -> None:
    """A few figures pinned against the datasheets cited in the files, so an edit is deliberate."""
    nano, nx, agx, xavier = (
        load_profile(n)
        for n in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-xavier-nx")
    )
    assert (nano.cpu_cores, nano.memory_mb, nano.accelerator.dla_cores) == (6, 8192, 0)
    assert (nx.cpu_cores, nx.memory_mb, nx.accelerator.dla_cores) == (8, 16384, 2)
    assert (agx.cpu_cores, agx.memory_mb, agx.accelerator.dla_cores) == (12, 65536, 2)
    assert {nano.accelerator.compute_capability, nx.accelerator.compute_capability} == {"8.7"}
    assert (xavier.accelerator.compute_capability, xavier.jetpack, xavier.tensorrt) == ("7.2", "5.1", "8.5.2")
    assert nano.tensorrt == nx.tensorrt == agx.tensorrt == "10.3"
    assert load_profile("raspberry-pi-5").cpu_cores == load_profile("raspberry-pi-4").cpu_cores == 4


def test_package_data_ships_the_profiles() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["edgeglm.devices"] == ["profiles/*.toml"]


# --- search path: user folders add and override -------------------------------------------------


def test_a_folder_in_edgeglm_devices_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "mine"
    _write(user, "press-07", VALID)
    pi5 = (SHIPPED_DIR / "raspberry-pi-5.toml").read_text().replace("memory_mb = 4096", "memory_mb = 8192")
    _write(user, "raspberry-pi-5", pi5)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("EDGEGLM_DEVICES", f"{empty}:{user}")

    assert profile_dirs() == [empty, user, SHIPPED_DIR]
    by_name = {p.name: p for p in list_profiles()}
    assert set(by_name) == REQUIRED | {"press-07"}
    assert by_name["raspberry-pi-5"].memory_mb == 8192
    assert by_name["raspberry-pi-5"].source == user / "raspberry-pi-5.toml"
    assert load_profile("press-07").source == user / "press-07.toml"
    assert load_profile("raspberry-pi-4").source == SHIPPED_DIR / "raspberry-pi-4.toml"


def test_extra_folders_come_before_edgeglm_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, cli_dir = tmp_path / "env", tmp_path / "cli"
    _write(env_dir, "press-07", VALID)
    _write(cli_dir, "press-07", VALID.replace("memory_mb = 2048", "memory_mb = 1024"))
    monkeypatch.setenv("EDGEGLM_DEVICES", str(env_dir))

    assert profile_dirs([cli_dir]) == [cli_dir, env_dir, SHIPPED_DIR]
    assert load_profile("press-07", [cli_dir]).memory_mb == 1024
    assert load_profile("press-07").memory_mb == 2048
    assert [p.name for p in list_profiles([str(cli_dir)])].count("press-07") == 1


def test_a_missing_profile_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        profile_dirs([tmp_path / "nope"])
    monkeypatch.setenv("EDGEGLM_DEVICES", str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="EDGEGLM_DEVICES"):
        list_profiles()


def test_an_unknown_name_lists_the_known_ones_and_says_how_to_add_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("jetson-nano-classic")
    assert "jetson-orin-nano-8gb" in info.value.message and "raspberry-pi-4" in info.value.message
    assert "--devices-dir" in info.value.hint and "EDGEGLM_DEVICES" in info.value.hint


def test_a_profile_loads_from_a_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "my-orin", JETSON)
    profile = load_profile(str(path))
    assert profile.is_jetson and profile.latency_budget_ms == 5.0 and profile.accelerator.dla_cores == 0
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "other.toml")


# --- bad files: ConfigError naming file and key ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "press-07",
            VALID.replace("threads = 2", "threads = 2\ncolour = 'red'"),
            ["device.colour", "valid device keys"],
        ),
        ("press-07", VALID + "\n[gpu]\nkind = 'gpu'\n", ["gpu", "valid: schema_version, device, accelerator"]),
        ("press-07", VALID.replace('["onnxruntime"]', '["onnxruntime", "openvino"]'), ["device.backends", "openvino"]),
        ("press-07", VALID.replace('["int8", "fp32"]', '["int4"]'), ["device.precisions", "int4"]),
        ("press-07", VALID.replace('"aarch64"', '"armv7l"'), ["device.arch", "armv7l"]),
        ("press-08", VALID, ["device.name", "press-08"]),
        ("press-07", VALID.replace("schema_version = 1", "schema_version = 2"), ["schema_version = 2", "reads"]),
        ("press-07", VALID.replace("schema_version = 1\n", ""), ["schema_version"]),
        ("press-07", VALID.replace("threads = 2", "threads = 5"), ["device.threads", "cpu_cores = 4"]),
        ("press-07", VALID.replace("threads = 2", "threads = 0"), ["device.threads", "≥ 1"]),
        ("press-07", VALID.replace("cpu_cores = 4", 'cpu_cores = "4"'), ["device.cpu_cores", "integer"]),
        ("press-07", VALID.replace('python = "3.11"', "python = 3.11"), ["device.python", "number"]),
        ("press-07", VALID.replace("latency_budget_ms = 20.0", "latency_budget_ms = -1"), ["device.latency_budget_ms"]),
        ("press-07", VALID.replace("threads = 2\n", ""), ["missing", "device.threads"]),
        ("press-07", VALID.replace('["onnxruntime"]', '["tensorrt"]'), ["device.backends", "[accelerator]"]),
        ("press-07", VALID + "trt_workspace_mb = 256\n", ["device.trt_workspace_mb", "tensorrt"]),
        ("my-orin", JETSON + "dla = 2\n", ["accelerator.dla", "valid accelerator keys"]),
        ("my-orin", JETSON.replace('"8.7"', "8.7"), ["accelerator.compute_capability", "number"]),
        ("my-orin", JETSON.replace('kind = "gpu"', 'kind = "npu"'), ["accelerator.kind", "npu"]),
        ("press-07", VALID.replace("[device]", "[device"), ["not valid TOML"]),
    ],
    ids=[
        "unknown-key",
        "unknown-table",
        "bad-backend",
        "bad-precision",
        "bad-arch",
        "name-mismatch",
        "schema-version-2",
        "no-schema-version",
        "threads-over-cores",
        "threads-zero",
        "wrong-type",
        "unquoted-version",
        "negative-budget",
        "missing-key",
        "tensorrt-without-gpu",
        "workspace-without-tensorrt",
        "unknown-accelerator-key",
        "unquoted-compute-capability",
        "bad-accelerator-kind",
        "broken-toml",
    ],
)
def test_a_bad_profile_names_the_file_and_key(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = info.value.message
    assert message.startswith(str(path)), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert info.value.exit_code == 2


def test_unquoted_versions_get_a_hint_to_quote_them(tmp_path: Path) -> None:
    path = _write(tmp_path, "press-07", VALID.replace('python = "3.11"', "python = 3.10"))
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert "3.1" in info.value.message and 'python = "3.10"' in info.value.hint


def test_a_bad_user_file_breaks_listing_but_not_the_unknown_name_message(tmp_path: Path) -> None:
    _write(tmp_path, "broken", VALID)  # name says press-07
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        list_profiles([tmp_path])
    with pytest.raises(ConfigError, match="known: broken, generic-arm64"):
        load_profile("nope", [tmp_path])


def test_constructing_in_code_validates_too() -> None:
    with pytest.raises(ConfigError, match="compute_capability") as info:
        Accelerator(kind="gpu", name="x", compute_capability=8.7)  # type: ignore[arg-type]
    assert "quote" in info.value.hint
    base = load_profile("raspberry-pi-4")
    with pytest.raises(ConfigError, match="threads"):
        dataclasses.replace(base, threads=base.cpu_cores + 1)
    with pytest.raises(ConfigError, match="backends"):
        dataclasses.replace(base, backends=())


# --- package surface ------------------------------------------------------------------------------


def test_the_package_exports_exactly_the_profile_api() -> None:
    assert sorted(edgeglm.devices.__all__) == sorted(
        [
            "BACKENDS",
            "PRECISIONS",
            "SCHEMA_VERSION",
            "SHIPPED_DIR",
            "Accelerator",
            "DeviceProfile",
            "list_profiles",
            "load_profile",
            "parse_profile",
            "profile_dirs",
        ]
    )
    assert all(hasattr(edgeglm.devices, n) for n in edgeglm.devices.__all__)
    assert DeviceProfile is edgeglm.devices.profile.DeviceProfile


def test_importing_the_profiles_pulls_no_heavy_library() -> None:
    code = (
        "import sys, edgeglm.devices\n"
        "edgeglm.devices.list_profiles()\n"
        "heavy = ('torch', 'onnx', 'onnxruntime', 'asyncssh', 'paho', 'numpy', 'cryptography')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_devices_lists_a_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "ACCELERATOR", "MEMORY", "BACKENDS", "PRECISIONS"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(REQUIRED)]}
    assert set(rows) == REQUIRED
    assert "gpu 8.7, 2 DLA" in rows["jetson-agx-orin-64gb"] and "64 GB" in rows["jetson-agx-orin-64gb"]
    assert "tensorrt,onnxruntime" in rows["jetson-orin-nano-8gb"]
    assert "none" in rows["raspberry-pi-4"] and "int8,fp32" in rows["raspberry-pi-4"]
    assert str(SHIPPED_DIR) in out


def test_cli_devices_json_and_user_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path, "press-07", VALID)
    assert main(["devices", "--devices-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in data}
    assert set(by_name) == REQUIRED | {"press-07"}
    assert by_name["press-07"]["source"] == str(tmp_path / "press-07.toml")
    assert by_name["jetson-xavier-nx"]["accelerator"]["compute_capability"] == "7.2"


def test_cli_devices_show_prints_every_field_and_the_source(capsys: pytest.CaptureFixture) -> None:
    assert main(["devices", "show", "jetson-orin-nano-8gb"]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["name"] == "jetson-orin-nano-8gb"
    assert fields["accelerator.compute_capability"] == "8.7"
    assert fields["backends"] == "tensorrt, onnxruntime"
    assert fields["tensorrt"] == "10.3" and fields["trt_workspace_mb"] == "1024"
    assert fields["source"] == str(SHIPPED_DIR / "jetson-orin-nano-8gb.toml")
    assert main(["devices", "show", "raspberry-pi-5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accelerator"] is None and data["jetpack"] is None and data["python"] == "3.11"


def test_cli_devices_show_finds_user_profiles_with_the_option_on_either_side(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _write(tmp_path, "press-07", VALID)
    assert main(["devices", "show", "press-07", "--devices-dir", str(tmp_path)]) == 0
    assert str(tmp_path / "press-07.toml") in capsys.readouterr().out
    assert main(["devices", "--devices-dir", str(tmp_path), "show", "press-07", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_mb"] == 2048


def test_cli_unknown_device_exits_2_with_a_hint(capsys: pytest.CaptureFixture) -> None:
    assert main(["devices", "show", "jetson-nano-classic"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown device profile 'jetson-nano-classic'" in err
    assert "hint:" in err and "--devices-dir" in err


def test_cli_bad_profile_exits_2_naming_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path, "press-07", VALID.replace("threads = 2", "threads = 9"))
    assert main(["devices", "--devices-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "press-07.toml") in err and "device.threads" in err


def test_cli_devices_help_teaches() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeglm.cli", "devices", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "examples: edgeglm devices" in out and "EDGEGLM_DEVICES" in out and "show" in out
