"""Measure a model file the way the edge sees it: size, compressed size, ONNX Runtime latency, accuracy."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from edgeglm.compress.export import INPUT_NAME
from edgeglm.metrics import phm08_score, rmse

__all__ = ["LatencyStats", "OnnxModel", "file_sizes", "measure_latency"]


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one ``session.run`` in milliseconds over ``runs`` timed runs."""

    batch: int
    median_ms: float
    p99_ms: float
    runs: int


def file_sizes(path: Path) -> dict[str, int]:
    """``{"size_bytes", "zstd_bytes"}``: the file and its zstd (level 19) compressed size (what OTA sends)."""
    data = Path(path).read_bytes()
    return {"size_bytes": len(data), "zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(data))}


class OnnxModel:
    """An ONNX Runtime CPU session with fixed threads, for fair side-by-side measurement.

    Args:
        path: the ONNX file.
        threads: intra-op threads (default: 1, a gateway core).
    """

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def predict(self, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
        """RUL per window. Shapes: ``(n, window, nodes)`` → ``(n,)``."""
        out = [
            self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x[i : i + batch_size], np.float32)})[0]
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out).reshape(-1) if out else np.zeros(0, np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        p = self.predict(x)
        return {"rmse": rmse(p, y), "score": phm08_score(p, y)}

    def latency(self, sample: np.ndarray, *, batch: int, runs: int = 200, warmup: int = 20) -> LatencyStats:
        return measure_latency(self.session, sample, batch=batch, runs=runs, warmup=warmup)


def measure_latency(session, sample: np.ndarray, *, batch: int, runs: int = 200, warmup: int = 20) -> LatencyStats:
    """Median and p99 of ``runs`` calls of ``session.run`` on ``batch`` windows from ``sample``."""
    reps = int(np.ceil(batch / len(sample)))
    x = np.ascontiguousarray(np.concatenate([sample] * reps)[:batch], np.float32)
    feed = {INPUT_NAME: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return LatencyStats(batch, statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))], runs)
