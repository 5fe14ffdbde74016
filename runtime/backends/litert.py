"""LiteRT backend: ``ai_edge_litert`` (the successor), else ``tflite_runtime`` (older images).

``tflite-runtime`` 2.14 does not work with numpy 2, so ``ai-edge-litert`` is preferred; a
device image that only has ``tflite_runtime`` still works. A ``.tflite`` model has a static
batch dimension; the interpreter is resized when a call's batch differs from the last one.
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
        if x.shape[0] != self._batch:
            self._resize(x.shape[0])
        self._interp.set_tensor(self._inputs[0]["index"], np.ascontiguousarray(x, dtype=self._inputs[0]["dtype"]))
        self._interp.invoke()
        return self._interp.get_tensor(self._outputs[0]["index"]).copy()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = next(iter(inputs.values()))
        first = self.run_one(x)
        outs = {self.output_names[0]: first}
        for d in self._outputs[1:]:
            outs[d["name"]] = self._interp.get_tensor(d["index"]).copy()
        return outs

    def close(self) -> None:
        self._interp = None
