"""Build a signed, device-specific bundle from a compressed model folder (``edgeglm build``).

Input: the folder ``edgeglm compress`` wrote (``model.onnx``, ``window_spec.json``,
``graph.json``, ``compress.json``, ``golden_windows.npy``) and a device profile. Output: a
:class:`~edgeglm.bundle.Bundle` holding, per the profile's backends,

- ``model.onnx`` for ``onnxruntime`` and ``tensorrt`` (TensorRT builds its engine from the
  QDQ graph on the device; an engine or calibration cache is never shipped: neither is
  portable across GPUs or TensorRT versions);
- ``trt.toml`` for ``tensorrt``: precision, workspace, DLA core, builder optimization level;
- ``model.tflite`` for ``litert`` (see :mod:`edgeglm.devices.litert`);

and a manifest with the golden inputs and the outputs ONNX Runtime (CPU, the reference
backend) gives for them, signed with Ed25519.

Reproducible: the same inputs and key give the same bytes except ``created`` (which honours
``SOURCE_DATE_EPOCH``, so even that can be pinned).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm import __version__
from edgeglm.bundle import FORMAT, FORMAT_VERSION, Bundle, Manifest, canonical_json, encode_array, sha256_hex
from edgeglm.devices.profile import DeviceProfile
from edgeglm.errors import ConfigError, ManifestError

__all__ = ["AlarmThresholds", "build_bundle", "golden_tolerance", "trt_settings"]

GOLDEN_FILE = "golden_windows.npy"
_COMPRESSED_FILES = ("model.onnx", "window_spec.json", "graph.json", "compress.json", GOLDEN_FILE)


@dataclass(frozen=True)
class AlarmThresholds:
    """When the edge raises and clears the low-RUL alarm (cycles), with debounce (predictions).

    Raise after ``debounce`` consecutive predictions with RUL ≤ ``rul_low``; clear after
    ``debounce`` consecutive ones with RUL ≥ ``rul_clear``. ``rul_clear > rul_low`` is the
    hysteresis band that stops an alarm from flapping on noise.
    """

    rul_low: float = 30.0
    rul_clear: float = 45.0
    debounce: int = 3

    def __post_init__(self) -> None:
        if not self.rul_clear > self.rul_low:
            raise ConfigError(
                f"rul_clear ({self.rul_clear}) must be above rul_low ({self.rul_low})",
                hint="leave a hysteresis band, e.g. --rul-low 30 --rul-clear 45",
            )
        if self.debounce < 1:
            raise ConfigError(f"debounce must be ≥ 1, not {self.debounce}", hint="e.g. --debounce 3")

    def to_dict(self) -> dict[str, Any]:
        return {"rul_low": self.rul_low, "rul_clear": self.rul_clear, "debounce": self.debounce}


def golden_tolerance(reference: np.ndarray, precision: str) -> dict[str, float]:
    """Absolute tolerances for the on-device golden check, per backend.

    The same ONNX file on ORT CPU differs across CPUs only by float summation order (FP32)
    or by requantization rounding (INT8), so ORT gets 1e-4 resp. 1 % of the output scale
    (``max(1, max|y|)``). TensorRT picks its own kernels and fusions: 5 % of the scale (not
    measured here: no GPU). LiteRT's tolerance is measured at build time (see the litert module).
    """
    scale = max(1.0, float(np.max(np.abs(reference))))
    ort = (1e-4 if precision == "fp32" else 1e-2) * scale
    return {"default": ort, "onnxruntime": ort, "tensorrt": 5e-2 * scale}


def trt_settings(profile: DeviceProfile, precision: str) -> str:
    """``trt.toml``: what the runtime passes to the TensorRT builder on the device."""
    trt_precision = "int8" if precision == "int8" and "int8" in profile.precisions else "fp16"
    if "fp16" not in profile.precisions and trt_precision == "fp16":
        trt_precision = "fp32"
    workspace = profile.trt_workspace_mb or 512
    dla = profile.accelerator.dla_cores if profile.accelerator else 0
    lines = [
        f"# TensorRT engine build settings for {profile.name} (TensorRT {profile.tensorrt}).",
        "# The edge runtime builds the engine from model.onnx on first start and caches it under",
        "# (TensorRT version, GPU, bundle hash). Engines are never shipped: they are not portable.",
        "schema_version = 1",
        f'precision = "{trt_precision}"          # int8: explicit quantization from the QDQ nodes',
        f"workspace_mb = {workspace}",
        "dla_core = -1                # -1 = GPU only"
        + (f"; 0..{dla - 1} = that DLA core (this device has {dla})" if dla else " (this device has no DLA)"),
        "gpu_fallback = true          # layers the DLA cannot run fall back to the GPU",
        "builder_optimization_level = 3",
        "min_batch = 1",
        "opt_batch = 1",
        "max_batch = 64",
    ]
    return "\n".join(lines) + "\n"


def _read_compressed(folder: Path) -> dict[str, Any]:
    missing = [n for n in _COMPRESSED_FILES if not (folder / n).is_file()]
    if missing:
        raise ConfigError(
            f"{folder} is not a compressed model folder: missing {', '.join(missing)}",
            hint="pass the --out folder of 'edgeglm compress' (re-run it if it predates golden_windows.npy)",
        )
    info = json.loads((folder / "compress.json").read_text())
    golden = np.load(folder / GOLDEN_FILE)
    if golden.dtype != np.float32 or golden.ndim != 3 or len(golden) == 0:
        raise ConfigError(f"{folder / GOLDEN_FILE} must hold float32 windows (n, time, sensors), not {golden.shape}")
    return {
        "info": info,
        "onnx": (folder / "model.onnx").read_bytes(),
        "window_spec": json.loads((folder / "window_spec.json").read_text()),
        "graph": json.loads((folder / "graph.json").read_text()),
        "golden": golden,
    }


def _tensor_infos(onnx_bytes: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    model = onnx.load_model_from_string(onnx_bytes)
    init = {i.name for i in model.graph.initializer}

    def info(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        shape: list[int | str] = [
            d.dim_param or "batch" if not d.HasField("dim_value") else d.dim_value for d in t.shape.dim
        ]
        return {"name": v.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return [info(v) for v in model.graph.input if v.name not in init], [info(v) for v in model.graph.output]


def _reference_outputs(onnx_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the reference backend (ONNX Runtime, CPU, 1 thread) on the golden inputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))


def build_bundle(
    compressed: Path | str,
    profile: DeviceProfile,
    key: Any,
    *,
    version: str = "1",
    sequence: int | None = None,
    name: str | None = None,
    thresholds: AlarmThresholds | None = None,
    backends: tuple[str, ...] | None = None,
    created: str | None = None,
) -> Bundle:
    """Build and sign a bundle of ``compressed`` for ``profile`` (see module doc).

    Args:
        compressed: the output folder of ``edgeglm compress``.
        profile: the target device profile.
        key: Ed25519 private key (object or path to the PEM file).
        version: the model version shown to people (``"2"``, ``"2026.11-a"``).
        sequence: the anti-downgrade counter; devices refuse a lower one than they run.
            Defaults to ``version`` when that is an integer.
        name: model name (default: the checkpoint folder's name).
        thresholds: alarm thresholds shipped with the model (overridable on the device).
        backends: restrict to these of the profile's backends (default: all of them; LiteRT as a
            fallback backend is skipped with a note in the manifest when litert-torch is missing,
            as the profile's preferred backend it is required).
        created: ISO-8601 creation time (default: ``SOURCE_DATE_EPOCH`` or now).
    """
    from edgeglm.signing import load_private_key, sign

    folder = Path(compressed)
    notes: list[str] = []
    src = _read_compressed(folder)
    info = src["info"]
    if sequence is None:
        if not version.isdigit():
            raise ConfigError(
                f"--sequence is needed when the version ({version!r}) is not an integer",
                hint="pass --sequence N, a counter that grows with every release (devices refuse lower ones)",
            )
        sequence = int(version)
    chosen = tuple(profile.backends) if backends is None else tuple(backends)
    if backends is None and "litert" in chosen[1:]:
        from edgeglm.devices.litert import litert_available

        if not litert_available():  # a fallback backend: skip it, say so, keep the preferred one
            chosen = tuple(b for b in chosen if b != "litert")
            notes.append(
                "model.tflite skipped (LiteRT is a fallback for this profile and litert-torch is not "
                "installed: pip install 'edgeglm[litert]')"
            )
    unknown = [b for b in chosen if b not in profile.backends]
    if unknown or not chosen:
        raise ConfigError(
            f"backends {', '.join(unknown) or '(none)'} are not among {profile.name}'s: {', '.join(profile.backends)}",
            hint="pick from the profile's backends (edgeglm devices show " + profile.name + ")",
        )
    precision = str(info.get("precision", "fp32"))
    if precision not in profile.precisions:
        raise ConfigError(
            f"the model is {precision} but {profile.name} supports {', '.join(profile.precisions)}",
            hint="compress with a recipe whose final precision the device supports",
        )
    thresholds = thresholds or AlarmThresholds()

    onnx_bytes: bytes = src["onnx"]
    inputs, outputs = _tensor_infos(onnx_bytes)
    if len(inputs) != 1:
        raise ManifestError(f"the model has {len(inputs)} inputs; EdgeGLM bundles take one window input")
    golden_in = {inputs[0]["name"]: src["golden"]}
    golden_out = _reference_outputs(onnx_bytes, golden_in)
    tolerance = golden_tolerance(next(iter(golden_out.values())), precision)

    files: dict[str, bytes] = {}
    table: dict[str, dict[str, Any]] = {}
    onnx_backends = [b for b in chosen if b in ("onnxruntime", "tensorrt")]
    if onnx_backends or "litert" in chosen:  # the ONNX file is also the reference the golden outputs came from
        files["model.onnx"] = onnx_bytes
        table["model.onnx"] = {"role": "model", "backends": onnx_backends}
    if "tensorrt" in chosen:
        trt = trt_settings(profile, precision).encode()
        files["trt.toml"] = trt
        table["trt.toml"] = {"role": "engine-config", "backends": ["tensorrt"]}
    if "litert" in chosen:
        from edgeglm.devices.litert import convert_for_bundle

        input_name = inputs[0]["name"]
        conversion = convert_for_bundle(
            folder,
            golden_in,
            golden_out,
            reference=lambda x: next(iter(_reference_outputs(onnx_bytes, {input_name: x}).values())),
            int8=precision == "int8",
        )
        files["model.tflite"] = conversion.model
        table["model.tflite"] = {"role": "model", "backends": ["litert"], **conversion.record()}
        tolerance["litert"] = conversion.tolerance
        notes += [conversion.summary(), *conversion.notes]
    for fname, data in files.items():
        table[fname].update({"sha256": sha256_hex(data), "size": len(data)})

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": name or str(info.get("model_name", folder.name)),
            "version": version,
            "sequence": sequence,
            "precision": precision,
            "architecture": info.get("architecture"),
            "recipe": info.get("recipe"),
            "test_rmse": info.get("test_rmse"),
        },
        "device": {
            "profile": profile.name,
            "arch": profile.arch,
            "backends": list(chosen),
            "threads": profile.threads,
            "latency_budget_ms": profile.latency_budget_ms,
        },
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": {"window_spec": src["window_spec"], "graph": src["graph"]},
        "thresholds": thresholds.to_dict(),
        "files": table,
        "golden": {
            "reference": "onnxruntime-cpu",
            "inputs": {k: encode_array(v) for k, v in golden_in.items()},
            "outputs": {k: encode_array(v) for k, v in golden_out.items()},
            "tolerance": tolerance,
        },
        "notes": notes,
        "created": created or _created_now(),
        "toolkit": {"name": "edgeglm", "version": __version__},
    }
    manifest_bytes = canonical_json(manifest)
    private = key if not isinstance(key, (str, Path)) else load_private_key(key)
    signature = sign(manifest_bytes, private)
    return Bundle(Manifest.from_bytes(manifest_bytes), manifest_bytes, signature.to_bytes(), files)


def _created_now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch and epoch.isdigit() else int(time.time())
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
