"""Durable, atomic file updates: a reader sees the old file or the new one, never half of either.

The recipe is the POSIX one: write a temporary file in the same directory, ``fsync`` it,
``rename`` it over the target (atomic within a file system), then ``fsync`` the directory so
the rename itself survives a power cut. Used for every piece of durable state: slot state,
the installed-bundle record, twins, key files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_symlink", "atomic_write_bytes", "atomic_write_json", "fsync_dir"]


def fsync_dir(path: Path | str) -> None:
    """Flush a directory entry change (create, rename, unlink) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path | str, obj: Any, *, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented UTF-8 JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def atomic_symlink(target: str, link: Path | str) -> None:
    """Point the symlink ``link`` at ``target`` atomically (new link beside it, then rename over).

    ``rename(2)`` replaces the old link in one step, so a process resolving ``link`` at any
    moment sees either the old target or the new one.
    """
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
