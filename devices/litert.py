"""The LiteRT (.tflite) model of a bundle, converted with litert-torch (extra ``edgeglm[litert]``).

litert-torch converts a *torch* module, so ``edgeglm compress`` keeps the last torch stage
beside the ONNX file (``torch_model/``, a checkpoint folder whose config holds the pruned
widths) and a sample of training windows (``calibration_windows.npy``). The build converts it

- to float32, always;
- to INT8 as well when the compressed model is INT8: PT2E post-training quantization with
  litert-torch's own quantizer (symmetric, per-channel weights, histogram-calibrated int8
  activations) calibrated on the even rows of the calibration windows, lowered to LiteRT's
  integer kernels (int8 input and output tensors);

and runs every candidate with the LiteRT interpreter (``ai_edge_litert``, through the
runtime's :class:`~edgeglm.runtime.backends.litert.LiteRTBackend`, the code a device runs).

**Which precision ships.** INT8 is only tried for an INT8 model, so the reference (ONNX
Runtime on ``model.onnx``, whose outputs are the golden outputs) is itself quantized. What
compress accepted is the ONNX model's quantization error; LiteRT's INT8 model is accurate
when its own quantization error is no larger. Both are measured against the float torch
model ``f`` on the decision windows ``D`` (the golden windows and the calibration windows
held out from calibration, the odd rows)::

    q_onnx = max_D |y_ref − f|        q_int8 = max_D |y_int8 − f|
    INT8 ships  ⇔  q_int8 ≤ max(1 % · s, q_onnx)          s = max(1, max_golden |y_ref|)

``1 % · s`` is the golden budget the INT8 ONNX file gets on a device. (Comparing the INT8
model with ``y_ref`` directly would measure the distance between two independently
quantized models, ≈ √2 times either's own error, and reject an INT8 model exactly as good
as the reference. Eight golden windows alone are too few: on a simulator STGNN they ranked
the two models the other way round from 1,183 validation windows.)

**Golden tolerance.** The device runs the golden inputs and compares with the golden
outputs, so the shipped model's error there is measured and recorded with headroom for
another CPU's kernels::

    e = max_golden |y_litert − y_ref|        tol = 2 e + slack

with ``slack`` = 2 output quantization steps (INT8) or ``1e-4 · s`` (float). The float model
must reproduce the torch model (``≤ 1e-3 · s``), else the conversion is wrong and the build
fails rather than ship it with a tolerance wide enough to pass.

The batch dimension is static (1): litert-torch cannot lower a reshape of a symbolic batch
(``Flatten`` in every EdgeGLM model), so the runtime runs larger batches in slices.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.errors import ConfigError, ExportError

__all__ = [
    "INSTALL_HINT",
    "Candidate",
    "LiteRTConversion",
    "LiteRTPrecision",
    "choose_precision",
    "convert_for_bundle",
    "litert_available",
    "litert_tolerance",
]

INSTALL_HINT = (
    "pip install 'edgeglm[litert]' (≈2.4 GB; in a checkout: pip install -c constraints.txt -e '.[litert]'), "
    "or build without LiteRT: --backends onnxruntime"
)
TORCH_MODEL_DIR = "torch_model"
CALIBRATION_FILE = "calibration_windows.npy"
#: The golden budget of an INT8 model, as a fraction of the output scale (see the module doc).
INT8_BUDGET = 1e-2
#: The float model may differ from the torch model by this fraction of the output scale.
FLOAT_CHECK = 1e-3
HEADROOM = 2.0
_FLOAT_SLACK = 1e-4
_INT8_SLACK_STEPS = 2


class LiteRTPrecision(str, Enum):
    """The numeric format of a ``.tflite`` candidate."""

    FP32 = "fp32"
    INT8 = "int8"  # PT2E static: int8 weights and activations, int8 input and output tensors


@dataclass(frozen=True)
class Candidate:
    """One converted model and what it measured (output units: cycles).

    Args:
        precision: float32 or INT8.
        model: the ``.tflite`` bytes.
        golden_error: ``max |y_litert − y_ref|`` over the golden windows.
        quantization_error: ``max |y_litert − f|`` over the decision windows (f: the torch model).
        output_step: the output tensor's quantization step (0 for a float output).
        convert_s: wall time of the conversion, seconds.
    """

    precision: LiteRTPrecision
    model: bytes = field(repr=False)
    golden_error: float
    quantization_error: float
    output_step: float
    convert_s: float

    @property
    def size_bytes(self) -> int:
        return len(self.model)


@dataclass(frozen=True)
class LiteRTConversion:
    """What :func:`convert_for_bundle` shipped, and the measurements it chose by.

    Args:
        chosen: the shipped candidate.
        candidates: every candidate measured (float first).
        reference_error: ``q_onnx``, the reference model's error against the torch model on
            the decision windows.
        decision_windows: how many windows the quantization errors were measured on.
        int8_budget: ``1 % · s`` (output units).
        tolerance: the LiteRT golden tolerance recorded in the manifest (output units).
        notes: why INT8 was not tried or not chosen, if so.
    """

    chosen: Candidate
    candidates: tuple[Candidate, ...]
    reference_error: float
    decision_windows: int
    int8_budget: float
    tolerance: float
    notes: tuple[str, ...] = ()

    @property
    def model(self) -> bytes:
        return self.chosen.model

    @property
    def precision(self) -> str:
        return self.chosen.precision.value

    def record(self) -> dict[str, Any]:
        """The manifest's ``model.tflite`` entry fields (deterministic: no timings)."""
        return {
            "precision": self.precision,
            "golden_max_abs_error": {c.precision.value: c.golden_error for c in self.candidates},
            "quantization_error": {
                "reference": self.reference_error,
                **{c.precision.value: c.quantization_error for c in self.candidates},
                "windows": self.decision_windows,
            },
            "int8_budget": self.int8_budget,
            "converter": "litert-torch " + _version("litert-torch"),
        }

    def summary(self) -> str:
        """One line for the build's notes: what shipped and the numbers it was chosen by."""
        q = next((c for c in self.candidates if c.precision is LiteRTPrecision.INT8), None)
        why = (
            f"INT8 error vs the float model {q.quantization_error:.4g}, the ONNX reference's "
            f"{self.reference_error:.4g}, budget {self.int8_budget:.4g} ({self.decision_windows} windows); "
            if q is not None
            else ""
        )
        golden = ", ".join(f"{c.precision.value} {c.golden_error:.4g}" for c in self.candidates)
        return (
            f"model.tflite is {self.precision}: {why}golden max error {golden}; LiteRT tolerance {self.tolerance:.4g}"
        )


def litert_available() -> bool:
    """Whether both halves of the extra are installed: the converter and the interpreter."""
    return all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))


def convert_for_bundle(
    compressed: Path | str,
    golden_in: dict[str, np.ndarray],
    golden_out: dict[str, np.ndarray],
    *,
    reference: Callable[[np.ndarray], np.ndarray] | None = None,
    int8: bool = True,
) -> LiteRTConversion:
    """Convert the compressed model's torch stage to ``.tflite`` and choose a precision (module doc).

    Args:
        compressed: the output folder of ``edgeglm compress`` (with ``torch_model/``).
        golden_in: the golden inputs, ``{name: (n, window, sensors)}`` float32.
        golden_out: the reference outputs for them, ``{name: (n, 1)}``.
        reference: runs the reference backend on windows, ``(m, window, sensors)`` →
            ``(m, 1)``; it measures the held-out calibration windows (default: None, the
            decision uses the golden windows alone).
        int8: also try INT8 (the build passes True when the compressed model is INT8).

    Raises:
        ConfigError: the litert extra is not installed, or the folder has no ``torch_model/``.
        ExportError: litert-torch cannot convert the model, or its float model is wrong.
    """
    if not litert_available():
        raise ConfigError(
            "this build needs model.tflite, which needs litert-torch and ai-edge-litert; they are not installed",
            hint=INSTALL_HINT,
        )
    import torch

    from edgeglm.checkpoint import load_model

    compressed = Path(compressed)
    folder = compressed / TORCH_MODEL_DIR
    if not folder.is_dir():
        raise ConfigError(
            f"{compressed} has no {TORCH_MODEL_DIR}/ (the torch stage LiteRT converts from)",
            hint="re-run 'edgeglm compress' with this EdgeGLM version",
        )
    model = load_model(folder).eval()
    x = np.ascontiguousarray(next(iter(golden_in.values())), dtype=np.float32)
    ref = next(iter(golden_out.values())).reshape(len(x), -1).astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))))
    budget = INT8_BUDGET * scale
    notes: list[str] = []
    calibration = _load_calibration(compressed / CALIBRATION_FILE) if int8 else None
    if int8 and calibration is None:
        notes.append(f"INT8 not tried: {CALIBRATION_FILE} is missing (re-run 'edgeglm compress')")
    # decision windows: the golden ones, plus the calibration rows held out from calibration
    xd, refd = x, ref
    if calibration is not None and reference is not None and len(calibration) > 1:
        held_out = calibration[1::2]
        xd = np.concatenate([x, held_out])
        refd = np.concatenate([ref, np.asarray(reference(held_out), np.float64).reshape(len(held_out), -1)])
    with torch.no_grad():
        f = model(torch.from_numpy(xd)).numpy().reshape(len(xd), -1).astype(np.float64)

    float_model, seconds = _timed(_convert_float, model, x[:1])
    fp = _measure(LiteRTPrecision.FP32, float_model, seconds, xd, len(x), refd, f)
    if not fp.quantization_error <= FLOAT_CHECK * scale:
        raise ExportError(
            f"litert-torch's float model differs from the torch model by {fp.quantization_error:.4g} "
            f"(allowed: {FLOAT_CHECK * scale:.4g})",
            hint="build without LiteRT (--backends onnxruntime) and report the model to litert-torch",
        )
    candidates = [fp]
    if calibration is not None:
        try:
            int8_model, seconds = _timed(_convert_int8, model, x[:1], calibration[0::2])
            candidates.append(_measure(LiteRTPrecision.INT8, int8_model, seconds, xd, len(x), refd, f))
        except Exception as exc:  # the PT2E / MLIR stack raises many types; float is always valid
            notes.append(f"INT8 conversion failed, float shipped: {type(exc).__name__}: {exc}"[:300])
    reference_error = float(np.max(np.abs(refd - f)))
    chosen, why = choose_precision(candidates, int8_budget=budget, reference_error=reference_error)
    return LiteRTConversion(
        chosen=chosen,
        candidates=tuple(candidates),
        reference_error=reference_error,
        decision_windows=len(xd),
        int8_budget=budget,
        tolerance=litert_tolerance(chosen, scale),
        notes=(*notes, *why),
    )


def choose_precision(
    candidates: Sequence[Candidate], *, int8_budget: float, reference_error: float
) -> tuple[Candidate, tuple[str, ...]]:
    """The candidate to ship: INT8 when ``q_int8 ≤ max(int8_budget, q_onnx)``, else float (module doc).

    Args:
        candidates: the float candidate, and the INT8 one when it was converted.
        int8_budget: ``1 % · s``, in output units.
        reference_error: ``q_onnx``, the reference model's own error against the float model.

    Returns:
        The chosen candidate, and a note when INT8 was measured but not chosen.
    """
    fp = next((c for c in candidates if c.precision is LiteRTPrecision.FP32), None)
    if fp is None:
        raise ValueError("the float candidate is always converted; it is missing")
    q = next((c for c in candidates if c.precision is LiteRTPrecision.INT8), None)
    if q is None:
        return fp, ()
    limit = max(int8_budget, reference_error)
    if q.quantization_error <= limit:
        return q, ()
    return fp, (
        f"INT8 error vs the float model {q.quantization_error:.4g} > {limit:.4g} (the larger of the INT8 budget "
        f"{int8_budget:.4g} and the ONNX reference's own error {reference_error:.4g}): float shipped",
    )


def litert_tolerance(chosen: Candidate, scale: float) -> float:
    """``2 e + slack``: 2 output quantization steps for an INT8 output, else ``1e-4 · scale`` (module doc)."""
    slack = _INT8_SLACK_STEPS * chosen.output_step if chosen.output_step > 0 else _FLOAT_SLACK * scale
    return HEADROOM * chosen.golden_error + slack


def _load_calibration(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    windows = np.load(path)
    return np.ascontiguousarray(windows, dtype=np.float32) if len(windows) else None


def _timed(fn: Any, *args: Any) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence litert-torch's progress lines (it reads an environment variable) for one conversion."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    os.environ[key] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _export(edge_model: Any) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        edge_model.export(str(path))
        return path.read_bytes()


def _convert_float(model: Any, sample: np.ndarray) -> bytes:
    import litert_torch
    import torch

    try:
        with _quiet():
            return _export(litert_torch.convert(model, (torch.from_numpy(sample),)))
    except Exception as exc:  # the converter raises many types; name the cause
        raise ExportError(
            f"litert-torch could not convert the model: {type(exc).__name__}: {exc}"[:500],
            hint="build without LiteRT: --backends onnxruntime",
        ) from exc


def _convert_int8(model: Any, sample: np.ndarray, calibration: np.ndarray) -> bytes:
    """PT2E static INT8 with litert-torch's quantizer, calibrated on ``calibration`` windows.

    ``torch.export`` → ``prepare_pt2e`` (observers) → one forward per calibration window →
    ``convert_pt2e`` (quantize/dequantize pairs, weights kept float for the converter to fold)
    → ``litert_torch.convert`` with the quantizer in its ``QuantConfig``, which lowers the pairs
    to integer kernels.
    """
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = (torch.from_numpy(sample),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    with torch.no_grad():
        for i in range(len(calibration)):  # the exported graph has the sample's static batch of 1
            prepared(torch.from_numpy(calibration[i : i + 1]))
    quantized = convert_pt2e(prepared, fold_quantize=False)
    with _quiet():
        return _export(litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)))


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    """Run a ``.tflite`` on ``x`` with the runtime's LiteRT backend (1 thread): ``(n, outputs)``."""
    from edgeglm.runtime.backends.litert import LiteRTBackend

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(model)
        backend = LiteRTBackend(path, threads=1)
        try:
            return backend.run_one(x).reshape(len(x), -1).astype(np.float64)
        finally:
            backend.close()


def _output_step(model: bytes) -> float:
    from edgeglm.runtime.backends.litert import load_interpreter_class

    interpreter_cls, _ = load_interpreter_class()
    detail = interpreter_cls(model_content=model).get_output_details()[0]
    if np.dtype(detail["dtype"]).kind not in "iu":
        return 0.0
    return float(detail["quantization"][0])


def _measure(
    precision: LiteRTPrecision,
    model: bytes,
    seconds: float,
    xd: np.ndarray,
    n_golden: int,
    refd: np.ndarray,
    f: np.ndarray,
) -> Candidate:
    """Run ``model`` on the decision windows ``xd`` (the golden ones first): errors vs reference and torch."""
    try:
        y = _run(model, xd)
    except Exception as exc:  # an interpreter that cannot run the model: the candidate is unusable
        raise ExportError(
            f"the {precision.value} model.tflite does not run in the LiteRT interpreter: {exc}",
            hint="build without LiteRT: --backends onnxruntime",
        ) from exc
    golden = float(np.max(np.abs(y[:n_golden] - refd[:n_golden])))
    quantization = float(np.max(np.abs(y - f)))
    finite = [v if np.isfinite(v) else float("inf") for v in (golden, quantization)]
    return Candidate(precision, model, finite[0], finite[1], _output_step(model), seconds)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
