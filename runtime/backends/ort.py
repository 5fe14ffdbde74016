"""ONNX Runtime backend: CPU everywhere; the CUDA / TensorRT execution providers where installed.

The bundle's ONNX file uses standard ops only (see the fuse pass); the hardware-specific
fusions happen here, at load, with ORT's ``ORT_ENABLE_ALL`` level. ``optimized_cache`` keeps
the optimized graph on the device so the next start skips that work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeglm.errors import BackendError, BackendUnavailable

__all__ = ["OnnxRuntimeBackend"]


class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession`` on one model file.

    Args:
        model_path: the ``.onnx`` file.
        threads: intra-op threads (the profile's default; 1 for latency on small models).
        providers: execution providers in order; default: CPU only. ``"auto"`` takes the
            TensorRT and CUDA providers first when this onnxruntime build has them.
    """

    name = "onnxruntime"

    def __init__(self, model_path: Path, *, threads: int = 1, providers: list[str] | str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the runtime extra installs it
            raise BackendUnavailable("onnxruntime is not installed", hint="pip install 'edgeglm[runtime]'") from exc
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        have = ort.get_available_providers()
        if providers == "auto":
            chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
            chosen.append("CPUExecutionProvider")
        else:
            chosen = list(providers or ["CPUExecutionProvider"])
            missing = [p for p in chosen if p not in have]
            if missing:
                raise BackendUnavailable(
                    f"onnxruntime here lacks {', '.join(missing)} (has: {', '.join(have)})",
                    hint="install the onnxruntime build with that provider (onnxruntime-gpu on Jetson)",
                )
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=chosen)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, …)
            raise BackendError(f"onnxruntime could not load {model_path}: {exc}", hint="verify the bundle") from exc
        self.providers = self._session.get_providers()
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs, strict=True))

    def run_one(self, x: np.ndarray) -> np.ndarray:
        """Run the single-input model on ``x``; returns the first output (the hot path)."""
        return self._session.run(self.output_names[:1], {self.input_names[0]: x})[0]

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
