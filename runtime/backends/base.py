"""The inference backend protocol and how a device picks one.

A backend loads one model file of a bundle and runs it on numpy arrays. Three exist:

==============  ==================================================  ==========================
name            what it imports                                     model file
==============  ==================================================  ==========================
onnxruntime     ``onnxruntime`` (CPU; CUDA / TensorRT EPs if there)  ``model.onnx``
litert          ``ai_edge_litert``, else ``tflite_runtime``         ``model.tflite``
tensorrt        ``tensorrt`` + ``cuda-python`` (Jetson)              ``model.onnx`` + ``trt.toml``
==============  ==================================================  ==========================

:func:`available_backends` says which of them this machine can import (without importing
them: ``importlib.util.find_spec``), :func:`select_backend` takes the first of the bundle's
backends, in the profile's order of preference, that is available.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgeglm.errors import BackendUnavailable

__all__ = ["BACKEND_MODULES", "Backend", "available_backends", "create_backend", "select_backend"]

#: backend name → the import names that provide it (any one suffices).
BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "litert": ("ai_edge_litert", "tflite_runtime"),
    "tensorrt": ("tensorrt",),
}

_INSTALL_HINTS = {
    "onnxruntime": "pip install 'edgeglm[runtime]'",
    "litert": "pip install ai-edge-litert   (or tflite-runtime on older images)",
    "tensorrt": "install JetPack's python3-libnvinfer on the Jetson (TensorRT comes with JetPack)",
}


@runtime_checkable
class Backend(Protocol):
    """One loaded model. ``run`` takes and returns ``{tensor name: array}``."""

    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def available_backends() -> list[str]:
    """Backends whose Python package is importable here, in a fixed order."""
    return [b for b, mods in BACKEND_MODULES.items() if any(_has_module(m) for m in mods)]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_backend(preferred: tuple[str, ...], *, requested: str | None = None) -> str:
    """The backend to use: ``requested`` if given and available, else the first available of ``preferred``.

    Raises:
        BackendUnavailable: listing what this machine has and how to install the missing one.
    """
    have = available_backends()
    if requested is not None:
        if requested not in BACKEND_MODULES:
            raise BackendUnavailable(
                f"unknown backend {requested!r}", hint=f"choose one of: {', '.join(BACKEND_MODULES)}"
            )
        if requested not in preferred:
            raise BackendUnavailable(
                f"the bundle has no model for backend {requested!r} (it has: {', '.join(preferred)})",
                hint="pick one of the bundle's backends or rebuild the bundle for a profile with this backend",
            )
        if requested not in have:
            raise BackendUnavailable(
                f"backend {requested!r} is not installed here (available: {', '.join(have) or 'none'})",
                hint=_INSTALL_HINTS[requested],
            )
        return requested
    for b in preferred:
        if b in have:
            return b
    raise BackendUnavailable(
        f"none of the bundle's backends ({', '.join(preferred)}) is installed here "
        f"(available: {', '.join(have) or 'none'})",
        hint="; ".join(f"{b}: {_INSTALL_HINTS[b]}" for b in preferred),
    )


def create_backend(
    name: str, model_dir: Path, model_file: str, *, threads: int, options: dict | None = None
) -> Backend:
    """Instantiate and load backend ``name`` on ``model_dir / model_file``."""
    if name == "onnxruntime":
        from edgeglm.runtime.backends.ort import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_dir / model_file, threads=threads, **(options or {}))
    if name == "litert":
        from edgeglm.runtime.backends.litert import LiteRTBackend

        return LiteRTBackend(model_dir / model_file, threads=threads)
    if name == "tensorrt":
        from edgeglm.runtime.backends.trt import TensorRTBackend

        return TensorRTBackend(model_dir / model_file, model_dir / "trt.toml", **(options or {}))
    raise BackendUnavailable(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKEND_MODULES)}")
