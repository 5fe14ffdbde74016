"""Device profiles: what a target device is and runs, as data in TOML files.

A profile says what :mod:`edgeglm.devices` builds a bundle for and what the edge runtime
expects to find: CPU architecture and cores, memory, the GPU (if any), the OS, JetPack and
TensorRT versions, the inference backends in order of preference, the precisions they run,
the default thread count and the latency budget of the golden-input health check.

One file per device, named after the profile (``jetson-orin-nano-8gb.toml``)::

    schema_version = 1

    [device]
    name = "jetson-orin-nano-8gb"       # must equal the file name without .toml
    description = "NVIDIA Jetson Orin Nano 8GB module"
    arch = "aarch64"                    # what platform.machine() says on the device
    cpu = "6-core Arm Cortex-A78AE v8.2 64-bit"
    cpu_cores = 6
    memory_mb = 8192
    os = "Ubuntu 22.04 (JetPack 6.2)"
    jetpack = "6.2"                     # optional (Jetson only)
    tensorrt = "10.3"                   # optional: the TensorRT shipped with that JetPack
    python = "3.10"                     # quote versions: 3.10 unquoted is the number 3.1
    backends = ["tensorrt", "onnxruntime"]
    precisions = ["int8", "fp16", "fp32"]
    threads = 4                         # 1..cpu_cores
    latency_budget_ms = 5.0
    trt_workspace_mb = 1024             # optional, only with the tensorrt backend

    [accelerator]                       # optional: leave the table out for CPU-only devices
    kind = "gpu"
    name = "NVIDIA Ampere, 1024 CUDA cores, 32 Tensor Cores"
    compute_capability = "8.7"
    dla_cores = 0                       # optional (default 0)

Profiles are searched in folders, first match wins: the ``--devices-dir`` folders of the
CLI, then the folders in ``$EDGEGLM_DEVICES`` (``os.pathsep``-separated), then the shipped
``profiles/`` folder, so a user profile named like a shipped one overrides it.

Only the standard library is used here (and ``tomli`` on Python 3.10), so the edge runtime
can import it on a gateway without torch or onnx.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeglm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
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

BACKENDS = ("tensorrt", "onnxruntime", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
_ARCHES = ("aarch64", "x86_64")
_ACCELERATOR_KINDS = ("gpu",)
SCHEMA_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().with_name("profiles")
_ENV_VAR = "EDGEGLM_DEVICES"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_VERSION_RE = re.compile(r"^\d+(\.\d+)*$")
_MAJOR_MINOR_RE = re.compile(r"^\d+\.\d+$")
_TOP_KEYS = ("schema_version", "device", "accelerator")
_ADD_HINT = (
    f"add a profile: copy a shipped one from {SHIPPED_DIR} to NAME.toml in a folder of yours and pass "
    f"that folder with --devices-dir DIR or list it in {_ENV_VAR}"
)


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _check_str(value: Any, key: str) -> None:
    _need(isinstance(value, str) and value.strip() != "", key, f"must be a non-empty string, got {value!r}")


def _check_int(value: Any, key: str, *, minimum: int) -> None:
    _need(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
    _need(value >= minimum, key, f"must be ≥ {minimum}, got {value}")


def _check_version(value: Any, key: str, pattern: re.Pattern[str], example: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(
            f'{key} must be a string like "{example}", got the number {value!r}',
            hint=f'quote it in the TOML file: {key} = "{example}"',
        )
    _need(
        isinstance(value, str) and pattern.match(value) is not None, key, f'must look like "{example}", got {value!r}'
    )


def _check_choices(value: Any, key: str, valid: tuple[str, ...]) -> None:
    _need(
        isinstance(value, tuple) and len(value) > 0 and all(isinstance(v, str) for v in value),
        key,
        f"must be a non-empty list of strings from {list(valid)}, got {value!r}",
    )
    unknown = [v for v in value if v not in valid]
    _need(not unknown, key, f"has unknown value(s) {unknown}; valid: {', '.join(valid)}")
    _need(len(set(value)) == len(value), key, f"lists a value twice: {list(value)}")


@dataclass(frozen=True)
class Accelerator:
    """The inference accelerator of a device (its GPU), as the vendor specifies it.

    Args:
        kind: ``"gpu"``.
        name: architecture and core counts, e.g. ``"NVIDIA Ampere, 1024 CUDA cores, 32 Tensor Cores"``.
        compute_capability: CUDA compute capability as a string, e.g. ``"8.7"``.
        dla_cores: NVIDIA deep-learning accelerator (NVDLA) engines (default: 0).

    Raises:
        ConfigError: a field has the wrong type or value; the message names the key.
    """

    kind: str
    name: str
    compute_capability: str
    dla_cores: int = 0

    def __post_init__(self) -> None:
        _need(self.kind in _ACCELERATOR_KINDS, "kind", f"must be one of {list(_ACCELERATOR_KINDS)}, got {self.kind!r}")
        _check_str(self.name, "name")
        _check_version(self.compute_capability, "compute_capability", _MAJOR_MINOR_RE, "8.7")
        _check_int(self.dla_cores, "dla_cores", minimum=0)


@dataclass(frozen=True)
class DeviceProfile:
    """One target device: hardware, software stack and inference defaults.

    Args:
        name: profile name, equal to its file name without ``.toml``; lowercase letters, digits, ``.``, ``_``, ``-``.
        description: one line for people.
        arch: ``"aarch64"`` or ``"x86_64"``, what ``platform.machine()`` says on the device.
        cpu: CPU as the vendor names it.
        cpu_cores: CPU cores.
        memory_mb: memory in MiB as sold (the OS sees less; on Jetson the GPU shares it).
        accelerator: the GPU, or None for CPU-only devices.
        os: operating system and release, e.g. ``"Ubuntu 22.04 (JetPack 6.2)"``.
        jetpack: JetPack release, or None off Jetson.
        tensorrt: TensorRT version shipped with that JetPack, or None.
        python: the OS's Python ``major.minor``, e.g. ``"3.10"``.
        backends: inference backends in order of preference, from :data:`BACKENDS`.
        precisions: precisions the device runs well, from :data:`PRECISIONS`.
        threads: default inference thread count, 1..``cpu_cores``.
        latency_budget_ms: golden-input health-check budget at batch 1 for a small model, in ms.
        trt_workspace_mb: TensorRT builder workspace in MiB (only with the ``tensorrt`` backend).
        source: the file the profile was loaded from, if any.

    Raises:
        ConfigError: a field has the wrong type or value; the message names the key.
    """

    name: str
    description: str
    arch: str
    cpu: str
    cpu_cores: int
    memory_mb: int
    accelerator: Accelerator | None
    os: str
    jetpack: str | None
    tensorrt: str | None
    python: str
    backends: tuple[str, ...]
    precisions: tuple[str, ...]
    threads: int
    latency_budget_ms: float
    trt_workspace_mb: int | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        _check_str(self.name, "name")
        _need(
            _NAME_RE.match(self.name) is not None,
            "name",
            f"must be lowercase letters, digits, '.', '_' or '-', got {self.name!r}",
        )
        for key in ("description", "cpu", "os"):
            _check_str(getattr(self, key), key)
        _need(self.arch in _ARCHES, "arch", f"must be one of {list(_ARCHES)}, got {self.arch!r}")
        _check_int(self.cpu_cores, "cpu_cores", minimum=1)
        _check_int(self.memory_mb, "memory_mb", minimum=1)
        _need(
            self.accelerator is None or isinstance(self.accelerator, Accelerator),
            "accelerator",
            f"must be an Accelerator or None, got {self.accelerator!r}",
        )
        if self.jetpack is not None:
            _check_version(self.jetpack, "jetpack", _VERSION_RE, "6.2")
        if self.tensorrt is not None:
            _check_version(self.tensorrt, "tensorrt", _VERSION_RE, "10.3")
        _check_version(self.python, "python", _MAJOR_MINOR_RE, "3.10")
        _check_choices(self.backends, "backends", BACKENDS)
        _check_choices(self.precisions, "precisions", PRECISIONS)
        _check_int(self.threads, "threads", minimum=1)
        _need(
            self.threads <= self.cpu_cores,
            "threads",
            f"= {self.threads} is more than cpu_cores = {self.cpu_cores}; use 1..{self.cpu_cores}",
        )
        budget = self.latency_budget_ms
        _need(
            isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0,
            "latency_budget_ms",
            f"must be a positive number of milliseconds, got {budget!r}",
        )
        object.__setattr__(self, "latency_budget_ms", float(budget))
        if "tensorrt" in self.backends:
            _need(
                self.accelerator is not None,
                "backends",
                "lists tensorrt, which needs an NVIDIA GPU: add an [accelerator] table or drop tensorrt",
            )
        if self.trt_workspace_mb is not None:
            _check_int(self.trt_workspace_mb, "trt_workspace_mb", minimum=1)
            _need(
                "tensorrt" in self.backends,
                "trt_workspace_mb",
                "is set but backends do not list tensorrt; drop it or add tensorrt",
            )

    @property
    def is_jetson(self) -> bool:
        """True when the device runs TensorRT (the Jetson family)."""
        return "tensorrt" in self.backends

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-able data (lists for tuples), without ``source``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Accelerator):
                value = {a.name: getattr(value, a.name) for a in fields(value)}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_DEVICE_FIELDS = tuple(f.name for f in fields(DeviceProfile) if f.name not in ("accelerator", "source"))
_DEVICE_REQUIRED = tuple(n for n in _DEVICE_FIELDS if n not in ("jetpack", "tensorrt", "trt_workspace_mb"))
_ACCEL_FIELDS = tuple(f.name for f in fields(Accelerator))
_ACCEL_REQUIRED = ("kind", "name", "compute_capability")


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    table = data.get(key)
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{where}: {key} must be a table [{key}], got {table!r}")
    return table


def _check_keys(
    table: dict[str, Any], section: str, valid: tuple[str, ...], required: tuple[str, ...], where: str
) -> None:
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid {section} keys: {', '.join(valid)}"
        )
    missing = [k for k in required if k not in table]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(f'{section}.{k}' for k in missing)}")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def parse_profile(data: dict[str, Any], *, name: str, source: Path | None) -> DeviceProfile:
    """Validate a parsed TOML document and build its profile.

    Args:
        data: the TOML document (``schema_version``, ``[device]``, optional ``[accelerator]``).
        name: the name the profile must have: its file name without ``.toml``.
        source: the file it came from (used in messages and kept on the profile), or None.

    Returns:
        The validated profile.

    Raises:
        ConfigError: naming the file and the key, for unknown or missing keys, wrong types or values,
            another ``schema_version``, or a ``name`` that differs from the file name.
    """
    where = str(source) if source is not None else f"device profile {name!r}"
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(_TOP_KEYS)} "
            "(device fields belong in the [device] table)"
        )
    if "schema_version" not in data:
        raise ConfigError(
            f"{where}: missing key schema_version",
            hint=f"add `schema_version = {SCHEMA_VERSION}` at the top of the file",
        )
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version != SCHEMA_VERSION:
        raise ConfigError(
            f"{where}: schema_version = {version!r}; this EdgeGLM reads device profiles of schema_version "
            f"{SCHEMA_VERSION} only",
            hint="upgrade EdgeGLM to read newer profiles, or rewrite the file in the schema of the shipped ones",
        )
    device = _table(data, "device", where)
    if device is None:
        raise ConfigError(f"{where}: missing table [device]; see a shipped profile in {SHIPPED_DIR}")
    _check_keys(device, "device", _DEVICE_FIELDS, _DEVICE_REQUIRED, where)
    if device["name"] != name:
        raise ConfigError(
            f"{where}: device.name = {device['name']!r} differs from the file name {name!r}",
            hint=f"rename the file to {device['name']}.toml or set name = {name!r}",
        )
    accelerator = None
    accel_table = _table(data, "accelerator", where)
    if accel_table is not None:
        _check_keys(accel_table, "accelerator", _ACCEL_FIELDS, _ACCEL_REQUIRED, where)
        try:
            accelerator = Accelerator(**accel_table)
        except ConfigError as exc:
            raise ConfigError(f"{where}: accelerator.{exc.message}", hint=exc.hint) from exc
    values = {"jetpack": None, "tensorrt": None, **{k: _as_tuple(v) for k, v in device.items()}}
    try:
        return DeviceProfile(**values, accelerator=accelerator, source=source)
    except ConfigError as exc:
        raise ConfigError(f"{where}: device.{exc.message}", hint=exc.hint) from exc


def _read(path: Path) -> DeviceProfile:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc.strerror or exc}") from exc
    return parse_profile(data, name=path.stem, source=path)


def profile_dirs(extra: Sequence[Path | str] = ()) -> list[Path]:
    """The folders searched for profiles, first match wins.

    Args:
        extra: folders given on the command line (``--devices-dir``), searched first.

    Returns:
        ``extra``, then the folders in ``$EDGEGLM_DEVICES`` (``os.pathsep``-separated), then the shipped
        folder; each folder once.

    Raises:
        ConfigError: a given folder does not exist.
    """
    given = [(Path(d), "--devices-dir") for d in extra]
    given += [(Path(d), _ENV_VAR) for d in os.environ.get(_ENV_VAR, "").split(os.pathsep) if d]
    out: list[Path] = []
    seen: set[Path] = set()
    for folder, origin in [*given, (SHIPPED_DIR, "shipped")]:
        if not folder.is_dir():
            raise ConfigError(
                f"device profile folder {folder} (from {origin}) does not exist or is not a folder",
                hint=f"create it, or fix {origin}",
            )
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            out.append(folder)
    return out


def _files(extra_dirs: Sequence[Path | str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in profile_dirs(extra_dirs):
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def list_profiles(extra_dirs: Sequence[Path | str] = ()) -> list[DeviceProfile]:
    """Every profile on the search path (user profiles override shipped ones), sorted by name.

    Raises:
        ConfigError: a profile file is invalid (the message names the file and key).
    """
    return [_read(path) for _, path in sorted(_files(extra_dirs).items())]


def load_profile(name_or_path: str | Path, extra_dirs: Sequence[Path | str] = ()) -> DeviceProfile:
    """Load one profile by name (searched as in :func:`profile_dirs`) or from a ``.toml`` file path.

    Raises:
        ConfigError: the name is unknown (the message lists the known names), the file does not exist,
            or the profile is invalid.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"device profile file {path} does not exist", hint=_ADD_HINT)
        return _read(path)
    files = _files(extra_dirs)
    if text not in files:
        raise ConfigError(
            f"unknown device profile {text!r}; known: {', '.join(sorted(files))}",
            hint=_ADD_HINT,
        )
    return _read(files[text])
