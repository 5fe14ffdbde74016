"""Inference backends: ONNX Runtime, LiteRT, TensorRT (each imported only when used)."""

from edgeglm.runtime.backends.base import Backend, available_backends, create_backend, select_backend

__all__ = ["Backend", "available_backends", "create_backend", "select_backend"]
