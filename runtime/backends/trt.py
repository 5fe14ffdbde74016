"""Native TensorRT backend (Jetson): build the engine on the device, cache it, run it.

**Not run on the development machines** (no NVIDIA GPU, no TensorRT wheels there): this
module is written against TensorRT 10's documented Python API (``tensorrt.Builder``,
``OnnxParser``, ``IBuilderConfig.set_memory_pool_limit``, ``IExecutionContext.set_tensor_address``
/ ``execute_async_v3``) and cuda-python's runtime bindings, and stays behind an import check.
The pieces that do not need a GPU — reading ``trt.toml``, the cache key, the cache layout —
are tested.

Engines are not portable across GPUs or TensorRT versions, so bundles never carry one: the
first start builds it from the bundle's INT8 QDQ ONNX with the settings in ``trt.toml`` and
stores it under ``cache_dir/<key>.engine`` where the key hashes (TensorRT version, GPU name and
compute capability, bundle hash, trt.toml). A change in any of them builds a new engine.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.errors import BackendError, BackendUnavailable, ConfigError

__all__ = ["TensorRTBackend", "TrtSettings", "engine_cache_key", "read_trt_settings"]


@dataclass(frozen=True)
class TrtSettings:
    """``trt.toml``: what the builder is told. See :func:`edgeglm.devices.build.trt_settings`."""

    precision: str = "int8"
    workspace_mb: int = 512
    dla_core: int = -1
    gpu_fallback: bool = True
    builder_optimization_level: int = 3
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 64

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"trt.toml: precision {self.precision!r} is not fp32, fp16 or int8")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ConfigError(f"trt.toml: builder_optimization_level {self.builder_optimization_level} not in 0..5")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("trt.toml: need 1 ≤ min_batch ≤ opt_batch ≤ max_batch")


def read_trt_settings(path: Path) -> TrtSettings:
    from edgeglm.tomlfile import read_toml

    data = read_toml(path, what="TensorRT settings", hint="rebuild the bundle: trt.toml comes with it")
    data.pop("schema_version", None)
    valid = set(TrtSettings.__dataclass_fields__)
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}", hint=f"valid keys: {', '.join(sorted(valid))}")
    return TrtSettings(**data)


def engine_cache_key(*, trt_version: str, gpu: str, compute_capability: str, model: bytes, settings: bytes) -> str:
    """sha256 over everything an engine depends on; a change in any part means a rebuild."""
    h = hashlib.sha256()
    for part in (trt_version.encode(), gpu.encode(), compute_capability.encode(), model, settings):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed", hint="pip install cuda-python") from exc
    return cudart


def _check(result: tuple) -> Any:
    err, *rest = result
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {err}", hint="check the GPU with tegrastats / nvidia-smi")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    """A TensorRT engine built from the bundle's ONNX (cached), run with explicit device buffers."""

    name = "tensorrt"

    def __init__(self, model_path: Path, settings_path: Path, *, cache_dir: Path | str | None = None) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailable(
                "tensorrt is not installed", hint="on a Jetson: sudo apt install python3-libnvinfer (JetPack)"
            ) from exc
        self._trt = trt
        self._cudart = _cudart()
        self.settings = read_trt_settings(settings_path)
        model = Path(model_path).read_bytes()
        props = _check(self._cudart.cudaGetDeviceProperties(0))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        cc = f"{props.major}.{props.minor}"
        key = engine_cache_key(
            trt_version=trt.__version__,
            gpu=gpu,
            compute_capability=cc,
            model=model,
            settings=Path(settings_path).read_bytes(),
        )
        cache = Path(cache_dir or os.environ.get("EDGEGLM_TRT_CACHE", Path.home() / ".cache/edgeglm/trt"))
        cache.mkdir(parents=True, exist_ok=True)
        engine_path = cache / f"{key}.engine"
        self._logger = trt.Logger(trt.Logger.WARNING)
        if engine_path.is_file():
            blob = engine_path.read_bytes()
        else:
            blob = self._build(model)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, engine_path)
        self.engine_path = engine_path
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path}", hint=f"delete {engine_path} to rebuild")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) != mode]
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, bytes)

    def _build(self, model: bytes) -> bytes:
        trt, s = self._trt, self.settings
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT's ONNX parser rejected the model: {errors}", hint="use --backend onnxruntime")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
        config.builder_optimization_level = s.builder_optimization_level
        if s.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if s.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes: no calibrator
        if s.dla_core >= 0:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = s.dla_core
            if s.gpu_fallback:
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            rest = tuple(t.shape)[1:]
            profile.set_shape(t.name, (s.min_batch, *rest), (s.opt_batch, *rest), (s.max_batch, *rest))
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendError("TensorRT failed to build an engine", hint="see the TensorRT log above")
        return bytes(blob)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            ptr = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.input_names:
            x = np.ascontiguousarray(inputs[name], dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            self._context.set_input_shape(name, x.shape)
            ptr = self._buffer(name, x.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self._stream))
            self._context.set_tensor_address(name, ptr)
        outs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            out = np.empty(shape, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))
            self._context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outs[name] = out
        if not self._context.execute_async_v3(self._stream):
            raise BackendError("TensorRT execution failed", hint="see the TensorRT log above")
        for name, out in outs.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return outs

    def run_one(self, x: np.ndarray) -> np.ndarray:
        return self.run({self.input_names[0]: x})[self.output_names[0]]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
