"""Reading a TOML configuration file, with the errors every EdgeGLM config gives.

A missing, unreadable or malformed file is a :class:`ConfigError` that names the file and
what it was meant to be (``no cloud config at cloud.toml``; ``cloud.toml is not valid TOML
(cloud config): Expected '=' … (at line 3, column 7)``). Validating the keys is each config's
own job.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from edgeglm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["read_toml"]


def read_toml(path: Path | str, *, what: str, hint: str) -> dict[str, Any]:
    """Parse ``path``; ``what`` names the file's role in errors, ``hint`` says what to do if it is missing."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}", hint=hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc}", hint=hint) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({what}): {exc}", hint="fix the TOML at the line given") from exc
