"""Ed25519 keys and signatures for bundles (via the ``cryptography`` package).

A bundle's ``signature`` file signs the exact bytes of its ``manifest.json``; the manifest in
turn holds the sha256 of every other file, so one signature covers the whole bundle. Ed25519
signatures are deterministic, which keeps bundles reproducible.

Key files are PEM: the private key as unencrypted PKCS#8 (mode 0600), the public key as
SubjectPublicKeyInfo in ``<key>.pub``. A key is named by its *key id*, the first 16 hex digits
of the sha256 of the raw 32-byte public key, so an error can say which key signed a bundle and
which one the device trusts.

The signature file is JSON::

    {"algorithm": "ed25519", "key_id": "3f2a…", "signature": "<base64 of 64 bytes>"}
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgeglm.errors import ConfigError, SignatureError

__all__ = [
    "Signature",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify_signature",
]

ALGORITHM = "ed25519"

try:  # the runtime extra installs cryptography; say so when it is missing
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("edgeglm signing needs the 'cryptography' package: pip install 'edgeglm[runtime]'") from exc


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256(raw public key): a short, stable name for a key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(path: Path | str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new private key to ``path`` (mode 0600) and its public key to ``path.pub``.

    Refuses to overwrite an existing key unless ``overwrite``: a lost signing key means every
    device trusting it must be re-provisioned.
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    if not overwrite:
        for p in (path, pub_path):
            if p.exists():
                raise ConfigError(
                    f"{p} already exists",
                    hint="keep the existing key (devices trust it) or pass --force to replace it",
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path, pub_path


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM, PKCS#8) written by :func:`generate_keypair`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read signing key {path}: {exc.strerror}", hint="create one with: edgeglm keygen --out KEY"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key ({exc})",
            hint="pass the private key written by 'edgeglm keygen' (not the .pub file)",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key", hint="use 'edgeglm keygen'")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM SubjectPublicKeyInfo), e.g. ``signing.key.pub``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read public key {path}: {exc.strerror}",
            hint="pass the .pub file written next to the signing key by 'edgeglm keygen'",
        ) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a PEM public key ({exc})", hint="pass the .pub file written by 'edgeglm keygen'"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key", hint="use 'edgeglm keygen'")
    return key


@dataclass(frozen=True)
class Signature:
    """A detached Ed25519 signature with the id of the key that made it."""

    key_id: str
    value: bytes

    def to_bytes(self) -> bytes:
        doc = {"algorithm": ALGORITHM, "key_id": self.key_id, "signature": base64.b64encode(self.value).decode()}
        return (json.dumps(doc, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        try:
            doc = json.loads(data)
            if doc.get("algorithm") != ALGORITHM:
                raise ValueError(f"algorithm {doc.get('algorithm')!r}, expected {ALGORITHM!r}")
            value = base64.b64decode(doc["signature"], validate=True)
            if len(value) != 64:
                raise ValueError(f"{len(value)}-byte signature, expected 64")
            return cls(key_id=str(doc["key_id"]), value=value)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SignatureError(
                f"the signature file is malformed: {exc}", hint="rebuild the bundle with 'edgeglm build'"
            ) from exc


def sign(data: bytes, key: Ed25519PrivateKey) -> Signature:
    """Sign ``data`` (deterministic: the same key and data give the same bytes)."""
    return Signature(key_id=key_id(key.public_key()), value=key.sign(data))


def verify_signature(data: bytes, signature: Signature, key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``key``'s signature of ``data``."""
    trusted = key_id(key)
    if signature.key_id != trusted:
        raise SignatureError(
            f"signed with key {signature.key_id}, but the trusted key is {trusted}",
            hint="verify with the public key that matches the signing key, or rebuild the bundle with the trusted key",
        )
    try:
        key.verify(signature.value, data)
    except InvalidSignature as exc:
        raise SignatureError(
            f"the Ed25519 signature by key {trusted} does not match manifest.json: "
            "the manifest was changed after signing",
            hint="do not install this bundle; rebuild it from the compressed model with 'edgeglm build'",
        ) from exc
