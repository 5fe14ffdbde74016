"""The bundle: a signed, device-specific model package, and how to read and verify one.

A bundle is what travels to a device (``edgeglm flash`` over SSH, or OTA over MQTT). It is
either a folder or one file (a tar, zstd-compressed, members in a fixed order)::

    manifest.json   canonical JSON (sorted keys, no spaces): what the bundle is, for which
                    device, the sha256 and size of every other file, preprocessing, alarm
                    thresholds, golden inputs and the outputs the reference backend gave
    signature       Ed25519 over the exact bytes of manifest.json (see edgeglm.signing)
    model.onnx      standard ONNX (INT8 QDQ when quantized): ORT runs it, TensorRT builds from it
    model.tflite    for profiles that prefer LiteRT
    trt.toml        TensorRT engine build settings (Jetson profiles); never an engine

This module is torch-free and onnx-free: the edge runtime verifies bundles with it. Building
one is :mod:`edgeglm.devices.build`.

Verification runs its checks in a fixed order and stops at the first failure with an error
that names the check: ``format`` (format name and version) → ``signature`` → ``files`` (every
file present, size and sha256 as recorded, nothing extra) → ``device`` (profile name) →
``arch`` (CPU architecture) → ``sequence`` (anti-downgrade: never older than installed).
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.errors import (
    BundleError,
    DeviceMismatch,
    DowngradeError,
    HashMismatch,
    ManifestError,
)
from edgeglm.hashing import sha256_hex

__all__ = [
    "BUNDLE_SUFFIXES",
    "FORMAT",
    "FORMAT_VERSION",
    "Bundle",
    "Manifest",
    "VerifyReport",
    "canonical_json",
    "decode_array",
    "encode_array",
    "normalize_arch",
    "sha256_hex",
]

FORMAT = "edgeglm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature"
BUNDLE_SUFFIXES = (".eglm", ".tar.zst")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_BUNDLE_BYTES = 1 << 30  # 1 GiB uncompressed: far above any model this toolkit makes
_ZSTD_LEVEL = 19


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON document that gets signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """An array as JSON, exactly: dtype, shape and little-endian bytes in base64."""
    a = np.ascontiguousarray(a)
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(le.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises ManifestError on a malformed entry."""
    try:
        dtype = np.dtype(d["dtype"]).newbyteorder("<")
        raw = base64.b64decode(d["data"], validate=True)
        return np.frombuffer(raw, dtype=dtype).reshape(d["shape"]).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"malformed array in manifest: {exc}", hint="rebuild the bundle") from exc


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of the model: name, shape (``"batch"`` for the dynamic axis), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle as the manifest records it."""

    name: str
    sha256: str
    size: int
    role: str  # "model" | "engine-config"
    backends: tuple[str, ...] = ()


_REQUIRED = (
    "format",
    "format_version",
    "model",
    "device",
    "inputs",
    "outputs",
    "files",
    "golden",
    "created",
    "toolkit",
)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``. ``data`` is the document; the properties read it."""

    data: dict[str, Any]

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest.json is not valid JSON: {exc}", hint="rebuild the bundle") from exc
        if not isinstance(data, dict):
            raise ManifestError("manifest.json is not a JSON object", hint="rebuild the bundle")
        if data.get("format") != FORMAT:
            raise ManifestError(
                f"not an EdgeGLM bundle manifest (format {data.get('format')!r}, expected {FORMAT!r})",
                hint="pass a bundle written by 'edgeglm build'",
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ManifestError(
                f"bundle format version {version!r}; this EdgeGLM reads version {FORMAT_VERSION}",
                hint="upgrade edgeglm on this device" if newer else "rebuild the bundle with this EdgeGLM version",
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ManifestError(f"manifest.json lacks {', '.join(missing)}", hint="rebuild the bundle")
        m = cls(data)
        m.files  # noqa: B018 - validates the file table
        m.sequence  # noqa: B018
        return m

    def to_bytes(self) -> bytes:
        return canonical_json(self.data)

    # --- what the bundle is -------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.data["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.data["model"]["version"])

    @property
    def sequence(self) -> int:
        seq = self.data["model"].get("sequence")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ManifestError(f"model.sequence must be a non-negative integer, not {seq!r}", hint="rebuild")
        return seq

    @property
    def precision(self) -> str:
        return str(self.data["model"].get("precision", "fp32"))

    @property
    def profile(self) -> str:
        return str(self.data["device"]["profile"])

    @property
    def arch(self) -> str:
        return str(self.data["device"]["arch"])

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.data["device"]["backends"])

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in self.data["inputs"])

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in self.data["outputs"])

    @property
    def files(self) -> dict[str, FileEntry]:
        out: dict[str, FileEntry] = {}
        try:
            for name, e in self.data["files"].items():
                if not _NAME_RE.match(name) or name in (MANIFEST, SIGNATURE):
                    raise ValueError(f"file name {name!r} is not allowed")
                if not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) or not isinstance(e["size"], int):
                    raise ValueError(f"{name}: sha256/size malformed")
                out[name] = FileEntry(
                    name, e["sha256"], e["size"], e.get("role", "model"), tuple(e.get("backends", ()))
                )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest file table is malformed: {exc}", hint="rebuild the bundle") from exc
        return out

    def model_file(self, backend: str) -> str:
        """The file a backend loads (``model.onnx`` for onnxruntime and tensorrt, ``model.tflite`` for litert)."""
        for e in self.files.values():
            if e.role == "model" and backend in e.backends:
                return e.name
        raise ManifestError(
            f"the bundle has no model file for backend {backend!r} (it has: {', '.join(self.backends)})",
            hint="choose one of the bundle's backends, or rebuild the bundle for a profile that lists this backend",
        )

    # --- how it runs --------------------------------------------------------------------
    @property
    def window_spec(self) -> dict[str, Any]:
        return self.data["preprocessing"]["window_spec"]

    @property
    def graph(self) -> dict[str, Any]:
        return self.data["preprocessing"]["graph"]

    @property
    def thresholds(self) -> dict[str, Any]:
        return dict(self.data.get("thresholds", {}))

    def golden(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Golden inputs and the outputs the reference backend produced for them at build time."""
        g = self.data["golden"]
        return (
            {k: decode_array(v) for k, v in g["inputs"].items()},
            {k: decode_array(v) for k, v in g["outputs"].items()},
        )

    def golden_tolerance(self, backend: str) -> float:
        """Absolute tolerance for the golden check on ``backend`` (recorded at build time)."""
        tol = self.data["golden"].get("tolerance", {})
        return float(tol.get(backend, tol.get("default", 1e-3)))


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Bundle.verify` checked, in order; every entry passed (a failure raises)."""

    checks: tuple[tuple[str, str], ...]
    bundle_id: str

    def __str__(self) -> str:
        return "\n".join(f"  ok  {name:<10} {detail}" for name, detail in self.checks)


@dataclass
class Bundle:
    """A bundle in memory: the manifest, its signature and the other files' bytes.

    Bundles are small (tens of KB for this toolkit's models), so reading all of one is
    cheaper than juggling temp folders; :meth:`extract` writes the files out for installation.
    """

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    source: Path | None = None

    @property
    def bundle_id(self) -> str:
        """sha256 of manifest.json: names this exact bundle (the manifest pins every file)."""
        return sha256_hex(self.manifest_bytes)

    # --- reading ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str) -> Bundle:
        """Read a bundle folder or single file. Parses the manifest; does not verify (see :meth:`verify`)."""
        path = Path(path)
        if path.is_dir():
            members = _read_dir(path)
        elif path.is_file():
            members = _read_archive(path)
        else:
            raise BundleError(f"no bundle at {path}", hint="pass a bundle folder or file written by 'edgeglm build'")
        if MANIFEST not in members:
            raise ManifestError(f"{path} has no manifest.json", hint="pass a bundle written by 'edgeglm build'")
        if SIGNATURE not in members:
            raise BundleError(f"{path} has no signature file: the bundle is unsigned", hint="rebuild with --key KEY")
        manifest_bytes = members.pop(MANIFEST)
        signature_bytes = members.pop(SIGNATURE)
        return cls(Manifest.from_bytes(manifest_bytes), manifest_bytes, signature_bytes, members, source=path)

    # --- verification -------------------------------------------------------------------
    def verify_files(self) -> dict[str, FileEntry]:
        """The ``files`` check alone: every listed file present with its size and sha256, nothing extra.

        What a device re-checks at every start of an *installed* bundle, whose signature was
        verified when it was installed (:meth:`edgeglm.runtime.SlotStore.open_current`): it
        needs only hashlib, not the signature library.
        """
        entries = self.manifest.files
        for name, entry in entries.items():
            data = self.files.get(name)
            if data is None:
                raise HashMismatch(f"{name} is listed in the manifest but missing from the bundle", hint=_REBUILD)
            if len(data) != entry.size:
                raise HashMismatch(
                    f"{name} is {len(data)} bytes, the manifest says {entry.size}: truncated or altered", hint=_REBUILD
                )
            digest = sha256_hex(data)
            if digest != entry.sha256:
                raise HashMismatch(
                    f"{name} sha256 {digest[:16]}… differs from the manifest's {entry.sha256[:16]}…: "
                    "the file was altered",
                    hint=_REBUILD,
                )
        extra = sorted(set(self.files) - set(entries))
        if extra:
            raise HashMismatch(f"files not covered by the signature: {', '.join(extra)}", hint=_REBUILD)
        return entries

    def verify(
        self,
        public_key: Any,
        *,
        device: str | None = None,
        arch: str | None = None,
        installed_sequence: int | None = None,
    ) -> VerifyReport:
        """Run every check (see module doc); raise the matching :class:`BundleError` at the first failure.

        Args:
            public_key: the trusted Ed25519 public key (object or path to a ``.pub`` file).
            device: the profile name of the device that will run it (skip the check if None).
            arch: the device's CPU architecture, ``platform.machine()`` (skip if None).
            installed_sequence: the ``sequence`` of the bundle the device runs now; a lower one
                is a downgrade and refused (equal is allowed: re-installing the same model).
        """
        from edgeglm.signing import Signature, load_public_key, verify_signature

        checks: list[tuple[str, str]] = [("format", f"{FORMAT} v{FORMAT_VERSION}")]
        key = load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key
        signature = Signature.from_bytes(self.signature_bytes)
        verify_signature(self.manifest_bytes, signature, key)
        checks.append(("signature", f"Ed25519 by key {signature.key_id}"))

        entries = self.verify_files()
        checks.append(("files", f"{len(entries)} files, sha256 and size match"))

        if device is not None:
            if self.manifest.profile != device:
                raise DeviceMismatch(
                    f"bundle built for device profile {self.manifest.profile!r}, this device is {device!r}",
                    hint=f"build one for it: edgeglm build COMPRESSED_DIR --device {device} --key KEY --out BUNDLE",
                )
            checks.append(("device", device))
        if arch is not None:
            if normalize_arch(self.manifest.arch) != normalize_arch(arch):
                raise DeviceMismatch(
                    f"bundle is for {self.manifest.arch}, this device is {arch}",
                    hint="build the bundle for this device's profile (see 'edgeglm devices')",
                )
            checks.append(("arch", arch))
        if installed_sequence is not None:
            if self.manifest.sequence < installed_sequence:
                raise DowngradeError(
                    f"bundle sequence {self.manifest.sequence} is older than the installed {installed_sequence} "
                    f"(model {self.manifest.name} {self.manifest.version}): downgrade refused",
                    hint="build the model again with a higher --sequence to roll back on purpose",
                )
            checks.append(("sequence", f"{self.manifest.sequence} ≥ installed {installed_sequence}"))
        return VerifyReport(tuple(checks), self.bundle_id)

    # --- writing ------------------------------------------------------------------------
    def members(self) -> list[tuple[str, bytes]]:
        """All files in the fixed order: manifest, signature, then the rest by name."""
        return [(MANIFEST, self.manifest_bytes), (SIGNATURE, self.signature_bytes), *sorted(self.files.items())]

    def to_archive_bytes(self) -> bytes:
        """The single-file form: a tar with fixed member order and metadata, zstd-compressed."""
        import zstandard

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in self.members():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True, write_checksum=True).compress(
            buf.getvalue()
        )

    def write(self, out: Path | str) -> Path:
        """Write the bundle: a single file if ``out`` ends in .eglm / .tar.zst, else a folder."""
        from edgeglm.atomic import atomic_write_bytes

        out = Path(out)
        if out.name.endswith(BUNDLE_SUFFIXES):
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, self.to_archive_bytes())
        else:
            self.extract(out)
        return out

    def extract(self, folder: Path | str) -> Path:
        """Write every member into ``folder`` (created; existing bundle files replaced)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.members():
            (folder / name).write_bytes(data)
        return folder


_REBUILD = "do not install this bundle; copy it again or rebuild it with 'edgeglm build'"


def normalize_arch(arch: str) -> str:
    """The kernel's name for a CPU architecture (``uname -m``): ``arm64`` → ``aarch64``, ``amd64`` → ``x86_64``."""
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch.lower(), arch.lower())


def _read_dir(path: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        if not p.is_file():
            raise BundleError(f"{p} is not a regular file; a bundle folder holds files only", hint=_REBUILD)
        members[p.name] = p.read_bytes()
    return members


def _read_archive(path: Path) -> dict[str, bytes]:
    import zstandard

    raw = path.read_bytes()
    try:
        tar_bytes = zstandard.ZstdDecompressor().decompress(raw, max_output_size=_MAX_BUNDLE_BYTES)
    except zstandard.ZstdError as exc:
        raise BundleError(
            f"{path} is not a readable bundle file ({len(raw)} bytes): {exc}; it is truncated or corrupt",
            hint=_REBUILD,
        ) from exc
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for info in tar:
                if not info.isfile() or not _NAME_RE.match(info.name):
                    raise BundleError(f"{path}: unexpected archive member {info.name!r}", hint=_REBUILD)
                if info.name in members:
                    raise BundleError(f"{path}: duplicate archive member {info.name!r}", hint=_REBUILD)
                f = tar.extractfile(info)
                assert f is not None
                data = f.read()
                if len(data) != info.size:
                    raise BundleError(f"{path}: member {info.name} is truncated", hint=_REBUILD)
                members[info.name] = data
    except tarfile.TarError as exc:
        raise BundleError(f"{path} is not a valid bundle archive: {exc}", hint=_REBUILD) from exc
    return members
