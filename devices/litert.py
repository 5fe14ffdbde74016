"""The LiteRT (.tflite) model of a bundle, converted with litert-torch (extra ``edgeglm[litert]``).

litert-torch converts a *torch* module, so ``edgeglm compress`` keeps the final torch stage
beside the ONNX file (``torch_model/``, a checkpoint folder). The build converts it twice —
float, and INT8 through PT2E post-training quantization calibrated on the golden windows —
runs both with the LiteRT interpreter (``ai_edge_litert``) on the golden inputs, and ships the
INT8 model only if its error against the reference outputs is within the INT8 tolerance the
ONNX model gets; otherwise the float model. The measured error becomes the bundle's LiteRT
golden tolerance (with headroom), so the device checks what was measured here.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

from edgeglm.errors import ConfigError, ExportError

__all__ = ["INSTALL_HINT", "convert_for_bundle", "litert_available"]

INSTALL_HINT = "pip install 'edgeglm[litert]' (≈2 GB: litert-torch), or build without LiteRT: --backends onnxruntime"
TORCH_MODEL_DIR = "torch_model"


def litert_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("litert_torch") is not None


def _run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    from edgeglm.runtime.backends.litert import LiteRTBackend

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.tflite"
        path.write_bytes(model)
        backend = LiteRTBackend(path, threads=1)
        try:
            return np.concatenate([backend.run_one(x[i : i + 1]).reshape(1, -1)[:, 0] for i in range(len(x))])
        finally:
            backend.close()


def convert_for_bundle(
    compressed: Path, golden_in: dict[str, np.ndarray], golden_out: dict[str, np.ndarray]
) -> tuple[bytes, float, str]:
    """Convert the compressed model's torch stage to ``.tflite``; return (bytes, tolerance, precision)."""
    if not litert_available():
        raise ConfigError(
            "this device profile prefers LiteRT, and building model.tflite needs litert-torch, which is not installed",
            hint=INSTALL_HINT,
        )
    import litert_torch
    import torch

    from edgeglm.checkpoint import load_checkpoint, load_model

    folder = Path(compressed) / TORCH_MODEL_DIR
    if not folder.is_dir():
        raise ConfigError(
            f"{compressed} has no {TORCH_MODEL_DIR}/ (the torch stage LiteRT converts from)",
            hint="re-run 'edgeglm compress' with this EdgeGLM version",
        )
    model = load_model(load_checkpoint(folder)).eval()
    x = next(iter(golden_in.values())).astype(np.float32)
    ref = next(iter(golden_out.values())).reshape(len(x), -1)[:, 0].astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))))
    sample = (torch.from_numpy(x[:1]),)
    candidates: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fp = litert_torch.convert(model, sample)
            fp.export(str(Path(tmp) / "fp.tflite"))
            candidates.append(("fp32", (Path(tmp) / "fp.tflite").read_bytes()))
        except Exception as exc:  # the converter raises many types; name the cause
            raise ExportError(
                f"litert-torch could not convert the model: {exc}", hint="build without LiteRT: --backends onnxruntime"
            ) from exc
        # INT8 is an optimization: when PT2E fails, the float model is always a valid fallback.
        with contextlib.suppress(Exception):
            candidates.insert(0, ("int8", _pt2e_int8(model, x, Path(tmp) / "int8.tflite")))
    int8_tol = 1e-2 * scale
    for precision, blob in candidates:
        err = float(np.max(np.abs(_run_tflite(blob, x) - ref)))
        if precision == "fp32" or err <= int8_tol:
            return blob, max(2.0 * err, 1e-4 * scale), precision
    raise AssertionError("unreachable: the float candidate is always accepted")


def _pt2e_int8(model, x: np.ndarray, out: Path) -> bytes:
    """PT2E post-training INT8 (litert-torch's quantizer), calibrated on the golden windows."""
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = (torch.from_numpy(x[:1]),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    exported = torch.export.export(model, sample).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(len(x)):
            prepared(torch.from_numpy(x[i : i + 1]))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export(str(out))
    return out.read_bytes()
