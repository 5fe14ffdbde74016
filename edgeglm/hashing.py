"""SHA-256 without loading OpenSSL where Python has its own implementation.

``hashlib`` loads OpenSSL's libcrypto (≈ 3.6 MB of resident memory measured here); the edge
runtime hashes a few small bundle files at start and nothing else, so it uses CPython's
built-in SHA-256 (``_sha2`` on 3.12+, ``_sha256`` on 3.11) when present, else ``hashlib``.
Same digests either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["sha256", "sha256_hex"]


def _builtin() -> Callable[..., Any]:
    try:
        from _sha2 import sha256 as impl  # CPython ≥ 3.12
    except ImportError:
        try:
            from _sha256 import sha256 as impl  # CPython 3.11
        except ImportError:  # another Python: OpenSSL's is fine
            from hashlib import sha256 as impl
    return impl


sha256: Callable[..., Any] = _builtin()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return sha256(data).hexdigest()
