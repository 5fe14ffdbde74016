"""One error tree for EdgeGLM.

Every error a user can cause or meet derives from :class:`EdgeGLMError`, says
what went wrong with the offending value, and carries a ``hint`` that tells the
next step. The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits
with the class's ``exit_code``; tracebacks only with ``--debug``::

    EdgeGLMError                  root; catch this to catch everything of ours
    ├── ConfigError               a TOML/CLI value is invalid (names the key)
    ├── DataError                 a data file is missing or malformed (names file and line)
    ├── CheckpointError           a checkpoint folder is missing, incomplete or mismatched
    ├── ExportError               a model could not be exported to a portable ONNX graph
    ├── CodecError                a sparse-update payload is truncated, corrupt or of another version
    ├── BundleError               a bundle cannot be trusted
    │   ├── SignatureError        the Ed25519 signature does not verify
    │   ├── HashMismatch          a file's sha256 or size differs from the manifest
    │   ├── ManifestError         the manifest is malformed or of another format version
    │   │   └── DeviceMismatch    the bundle was built for another device profile or CPU architecture
    │   └── DowngradeError        the bundle's sequence is older than what the device runs
    ├── BackendError              an inference backend failed
    │   └── BackendUnavailable    the asked backend is not installed on this device
    ├── ProtocolError             an MQTT envelope of another version or schema
    ├── OtaError                  an over-the-air update failed (and was rolled back)
    └── FlashError                flashing a device over SSH failed (and was rolled back)
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BundleError",
    "CheckpointError",
    "CodecError",
    "ConfigError",
    "DataError",
    "DeviceMismatch",
    "DowngradeError",
    "EdgeGLMError",
    "ExportError",
    "FlashError",
    "HashMismatch",
    "ManifestError",
    "OtaError",
    "ProtocolError",
    "SignatureError",
]


class EdgeGLMError(Exception):
    """Root of every EdgeGLM error.

    Args:
        message: what happened, with the offending value.
        hint: what the user should do next (printed on its own line by the CLI).
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(EdgeGLMError):
    """A configuration value (TOML key or CLI option) is invalid."""

    exit_code = 2


class DataError(EdgeGLMError):
    """A data file is missing or malformed; the message names the file and line."""

    exit_code = 3


class CheckpointError(EdgeGLMError):
    """A checkpoint folder is missing, incomplete, or does not match what was asked."""

    exit_code = 4


class ExportError(EdgeGLMError):
    """A model could not be exported to a portable ONNX graph."""

    exit_code = 5


class CodecError(EdgeGLMError):
    """A sparse-update payload is truncated, corrupt or of another codec version."""

    exit_code = 6


class BundleError(EdgeGLMError):
    """A bundle cannot be trusted or used."""

    exit_code = 10


class SignatureError(BundleError):
    """The bundle's Ed25519 signature does not verify against the trusted key."""

    exit_code = 11


class HashMismatch(BundleError):
    """A bundle file's sha256 or size differs from what the manifest records."""

    exit_code = 12


class ManifestError(BundleError):
    """The manifest is malformed, of an unknown format version, or for another device."""

    exit_code = 13


class DeviceMismatch(ManifestError):
    """The bundle was built for another device profile or CPU architecture."""

    exit_code = 14


class DowngradeError(BundleError):
    """The bundle's ``sequence`` is lower than the installed one (anti-downgrade)."""

    exit_code = 15


class BackendError(EdgeGLMError):
    """An inference backend failed to load or run a model."""

    exit_code = 20


class BackendUnavailable(BackendError):
    """The requested backend is not installed on this device."""

    exit_code = 21


class ProtocolError(EdgeGLMError):
    """An MQTT envelope is of another protocol version or does not match the schema."""

    exit_code = 30


class OtaError(EdgeGLMError):
    """An over-the-air update failed; the node stays on (or returns to) its previous model."""

    exit_code = 40


class FlashError(EdgeGLMError):
    """Flashing a device over SSH failed; the device stays on (or returns to) its previous slot."""

    exit_code = 41
