"""LiteRT backend: ``ai_edge_litert`` (the successor), else ``tflite_runtime`` (older images).

``tflite-runtime`` 2.14 does not work with numpy 2, so ``ai-edge-litert`` is preferred; a
device image that only has ``tflite_runtime`` still works.

Batch: a model whose batch dimension is dynamic (``shape_signature[0] == -1``) is resized to
each call's batch. litert-torch writes a *static* batch of 1 for our models (its dynamic-shape
lowering cannot reshape a symbolic batch), and resizing such a model breaks its constant
reshapes, so a call with another batch runs in slices of the model's batch instead.

Quantized I/O: an INT8 model from PT2E takes and returns int8 tensors. Inputs are quantized
and outputs dequantized with each tensor's ``(scale, zero_point)``::

    q = clip(round(x / scale) + zero_point, qmin, qmax)        y = (q − zero_point) · scale

so callers always see float32, whatever the model's precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeglm.errors import BackendError, BackendUnavailable

__all__ = ["LiteRTBackend", "load_interpreter_class"]


def load_interpreter_class() -> tuple[type, str]:
    """The ``Interpreter`` class and which package provided it."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

        return Interpreter, "tflite_runtime"
    except ImportError as exc:
        raise BackendUnavailable(
            "neither ai_edge_litert nor tflite_runtime is installed",
            hint="pip install ai-edge-litert",
        ) from exc


class LiteRTBackend:
    """A LiteRT interpreter on one ``.tflite`` file (single input, outputs by name)."""

    name = "litert"

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        interpreter_cls, self.provider = load_interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(model_path), num_threads=max(1, threads))
            self._interp.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError
            raise BackendError(f"LiteRT could not load {model_path}: {exc}", hint="verify the bundle") from exc
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self._batch = int(self._inputs[0]["shape"][0])
        signature = self._inputs[0].get("shape_signature", self._inputs[0]["shape"])
        self.dynamic_batch = len(signature) > 0 and int(signature[0]) == -1
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]

    def _resize(self, batch: int) -> None:
        for d in self._inputs:
            shape = list(d["shape"])
            shape[0] = batch
            self._interp.resize_tensor_input(d["index"], shape)
        self._interp.allocate_tensors()
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self._batch = batch

    def run_one(self, x: np.ndarray) -> np.ndarray:
        """The first output for input ``x`` (float32; any batch, see the module doc)."""
        return self._run_all(x)[0]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._run_all(next(iter(inputs.values())))
        return dict(zip(self.output_names, outs, strict=True))

    def _run_all(self, x: np.ndarray) -> list[np.ndarray]:
        if x.shape[0] != self._batch and self.dynamic_batch:
            self._resize(x.shape[0])
        if x.shape[0] == self._batch:
            return self._invoke(x)
        if self._batch < 1 or x.shape[0] % self._batch:
            raise BackendError(
                f"the LiteRT model has a static batch of {self._batch}; a batch of {x.shape[0]} does not split into it",
                hint=f"pass batches that are a multiple of {self._batch}",
            )
        slices = [self._invoke(x[i : i + self._batch]) for i in range(0, len(x), self._batch)]
        return [np.concatenate(parts) for parts in zip(*slices, strict=True)]

    def _invoke(self, x: np.ndarray) -> list[np.ndarray]:
        d = self._inputs[0]
        self._interp.set_tensor(d["index"], _quantize(x, d))
        self._interp.invoke()
        return [_dequantize(self._interp.get_tensor(o["index"]), o) for o in self._outputs]

    def close(self) -> None:
        self._interp = None


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float input → the tensor's dtype (quantized with its ``(scale, zero_point)`` when integer)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
    return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor as float32 (dequantized when integer)."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return y.copy()
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)
