"""INT8 post-training quantization with ONNX Runtime's QDQ quantizer, accuracy-aware.

This module wraps :mod:`onnxruntime.quantization` and does not re-implement it:
ONNX Runtime's calibrators measure the float model's tensor ranges on real training
windows, and ``quantize_static`` writes a QDQ graph (``QuantizeLinear`` /
``DequantizeLinear`` around every quantized op, INT8 weights per output channel).
The graph stays in standard ONNX ops; each runtime fuses the QDQ patterns into its own
integer kernels when it loads the model.

Accuracy-aware loop. On the validation windows, with ``Δ(K)`` the RMSE of the model
quantized with the node set ``K`` kept in float minus the float model's RMSE (cycles),
``drift`` the RMSE between quantized and float predictions, and ``B`` the budget:

1. Calibrate once; the ranges are cached and reused by every quantization below.
2. ``Δ₀ = Δ(keep_float)``. Done if ``|Δ₀| ≤ B``.
3. Sensitivity of every quantized node ``n``: the drift of the model with ``n`` *alone*
   quantized. One quantization and one validation pass per node.
4. Greedy: keep nodes in float in decreasing sensitivity, measuring ``Δ`` after each,
   until ``|Δ| ≤ B`` or ``max_float_nodes`` are kept.

The budget bounds ``|Δ|``, not ``Δ``: INT8 noise that moves the predictions a lot can lower
the validation RMSE of a weak model by chance (a 20× too coarse calibration of a briefly
trained STGNN gave Δ = −10.4 cycles), and such a model is not "as accurate" as the float one.

The loop costs ``N + k`` quantizations for ``N`` quantized nodes and ``k`` kept, each
followed by one validation pass; calibration runs once.

Why "alone quantized" and not "all but this one": in a QDQ graph a tensor stays quantized
while *any* of its producers or consumers is, so leaving one node out hides errors that sit
on shared tensors. On the STGNN below (MinMax, Δ₀ = 0.75), leave-one-out found no node
worth more than 0.13 of the 3.7-cycle drift and 8 float nodes only brought Δ to 0.66; the
"alone" ranking put the first block's skip path (the input embedding, then its residual
scaling, i.e. the ``Mul`` that BatchNorm folding puts on the skip path, and the residual
sum) at 3.0 and 2.2 cycles of drift alone, and keeping those 2 nodes in float brought Δ to 0.23.

Choices, measured on this machine (AMD EPYC with AVX-512 VNNI, ONNX Runtime 1.32, 1 thread)
on an STGNN (16 channels, 3 blocks, 19 sensors, window 30) trained on the simulator
(validation RMSE 35 cycles):

- Calibration: ``PERCENTILE`` (99.999 %, asymmetric) is the default, chosen by drift, which
  is less noisy than Δ (a 3-cycle drift moves an RMSE of 35 by only ~0.1, either way).
  Drift / Δ on two trainings (12 and 25 epochs): Percentile 3.15 / −0.33 and 3.13 / +0.05,
  MinMax 3.82 / −0.28 and 3.67 / +0.75, Entropy 10.3 / +1.8 and 13.0 / +2.9 (and 60 s of
  calibration against 1.5–3.5 s).
- Activations ``QUInt8`` with ``QInt8`` weights (U8S8): ORT's x86 kernels are built for
  it; S8S8 ran 1.5× slower (196 against 128 µs at batch 1, 21–23 against 14–15 ms at
  batch 64). On ARM both are native. No ``reduce_range``: VNNI does not saturate.
- Op types: ONNX Runtime's own list by default (every op it can quantize; integer-only
  accelerators need the whole graph in INT8). Leaving the elementwise ops float
  (``op_types = ["Conv", "Gemm", …]``) gave drift 2.5 instead of 3.2 at the same latency.
- ``quant_pre_process`` is not run: after the fuse pass it changed nothing measurable
  (same Δ, same latency); ``quantize_static`` runs shape inference itself.

What INT8 buys at this size on x86: a 2× smaller file (weights 4×, the rest is graph), not
speed. Batch 1: 0.127 ms against 0.123 ms float (per-op overhead dominates); batch 64:
13.6–14.7 against 15.6–15.9 ms. ``QLinearConv`` on these (k×1) convolutions takes as long as
the float NCHWc convolution and ``QLinearMul`` is slower than ``Mul``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import onnx

from edgeglm.compress.export import INPUT_NAME, op_counts
from edgeglm.compress.passes import PassConfig, PassContext, PassResult, Stage, register_pass
from edgeglm.errors import ConfigError, ExportError
from edgeglm.metrics import rmse

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "MIN_CALIBRATION_WINDOWS",
    "ActivationType",
    "CalibrationMethod",
    "CalibrationReader",
    "FloatNode",
    "QuantizeConfig",
    "QuantizeResult",
    "Sensitivity",
    "WindowReader",
    "quantize",
]

#: Fewest calibration windows accepted: fewer gives ranges that depend on which windows were drawn.
MIN_CALIBRATION_WINDOWS = 64
_EVAL_BATCH = 256


class CalibrationMethod(str, Enum):
    """How activation ranges are read from the calibration windows (ONNX Runtime's calibrators).

    - ``MINMAX``: the observed minimum and maximum.
    - ``PERCENTILE``: the ``percentile`` of ``|x|`` over a 2048-bin histogram (clips rare outliers).
    - ``ENTROPY``: the threshold minimising the KL divergence between the float and the
      128-level histogram (TensorRT's method) over a 2048-bin histogram. ``quantize_static``
      alone would use 128 bins for both, which degenerates to MinMax.
    """

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"

    def to_ort(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod as OrtMethod

        return {
            CalibrationMethod.MINMAX: OrtMethod.MinMax,
            CalibrationMethod.PERCENTILE: OrtMethod.Percentile,
            CalibrationMethod.ENTROPY: OrtMethod.Entropy,
        }[self]


class ActivationType(str, Enum):
    """Integer type of quantized activations (weights are always signed INT8)."""

    UINT8 = "uint8"  # asymmetric; ORT's fast path on x86 (U8S8)
    INT8 = "int8"  # symmetric-friendly; native on ARM (S8S8)

    def to_ort(self) -> Any:
        from onnxruntime.quantization import QuantType

        return QuantType.QUInt8 if self is ActivationType.UINT8 else QuantType.QInt8


@runtime_checkable
class CalibrationReader(Protocol):
    """Anything that yields model inputs for calibration: ``{"window": (batch, window, nodes) float32}``.

    It may be iterated more than once (each pass starts over). Ten lines suffice::

        class MyReader:
            def __init__(self, x): self.x = x
            def __iter__(self):
                for i in range(0, len(self.x), 16):
                    yield {"window": self.x[i : i + 16]}
    """

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...


class WindowReader:
    """Calibration windows drawn evenly across the *training* windows (never the test set).

    Windows are ordered by unit and time, so evenly spaced indices cover every unit and
    every stage of life, healthy to failing.

    Args:
        windows_x: training windows, ``(n, window, nodes)`` float32.
        limit: windows to draw (default: 512); all of them when ``n ≤ limit``.
        batch: windows per yielded batch (default: 16).
        input_name: the model's input name (default: ``"window"``).

    Raises:
        ConfigError: ``windows_x`` is not 3-D, or ``limit``/``batch`` < 1.
    """

    def __init__(self, windows_x: np.ndarray, *, limit: int = 512, batch: int = 16, input_name: str = INPUT_NAME):
        x = np.asarray(windows_x)
        if x.ndim != 3:
            raise ConfigError(f"calibration windows must be (n, window, nodes), got shape {x.shape}")
        if limit < 1 or batch < 1:
            raise ConfigError(f"WindowReader: limit and batch must be ≥ 1, got limit={limit}, batch={batch}")
        idx = np.linspace(0, len(x) - 1, min(limit, len(x))).round().astype(int) if len(x) else np.zeros(0, int)
        self.x = np.ascontiguousarray(x[idx], dtype=np.float32)
        self.batch = batch
        self.input_name = input_name

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.x), self.batch):
            yield {self.input_name: self.x[i : i + self.batch]}


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Settings of the quantize pass (the ``[quantize]`` table of a recipe).

    Args:
        method: calibration method, ``"minmax"``, ``"percentile"`` or ``"entropy"`` (default: percentile).
        per_channel: one weight scale per output channel (default: True).
        activation_type: ``"uint8"`` or ``"int8"`` activations (default: uint8).
        calibration_size: training windows to calibrate on, ≥ 64 (default: 512).
        accuracy_budget: largest allowed ``|ΔRMSE|`` on the validation windows, cycles (default: 0.3).
        keep_float: node names always kept in float (default: none).
        max_float_nodes: most nodes the accuracy loop may add to ``keep_float``; 0 turns the
            loop off (default: 8).
        percentile: the ``PERCENTILE`` method's percentile (default: 99.999).
        op_types: op types to quantize; empty for ONNX Runtime's full list (default: empty).
    """

    kind: ClassVar[str] = "quantize"
    method: CalibrationMethod = CalibrationMethod.PERCENTILE
    per_channel: bool = True
    activation_type: ActivationType = ActivationType.UINT8
    calibration_size: int = 512
    accuracy_budget: float = 0.3
    keep_float: tuple[str, ...] = ()
    max_float_nodes: int = 8
    percentile: float = 99.999
    op_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", _enum(CalibrationMethod, self.method, "method"))
        object.__setattr__(self, "activation_type", _enum(ActivationType, self.activation_type, "activation_type"))
        if isinstance(self.keep_float, str) or not all(isinstance(n, str) for n in self.keep_float):
            raise ConfigError(f"[quantize] keep_float must be a list of node names, got {self.keep_float!r}")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"[quantize] per_channel must be true or false, got {self.per_channel!r}")
        if not isinstance(self.calibration_size, int) or self.calibration_size < MIN_CALIBRATION_WINDOWS:
            raise ConfigError(
                f"[quantize] calibration_size={self.calibration_size!r} is too small; "
                f"use at least {MIN_CALIBRATION_WINDOWS} windows",
                hint="512 training windows is the default",
            )
        if not self.accuracy_budget >= 0:
            raise ConfigError(f"[quantize] accuracy_budget must be ≥ 0 cycles of ΔRMSE, got {self.accuracy_budget}")
        if not isinstance(self.max_float_nodes, int) or self.max_float_nodes < 0:
            raise ConfigError(f"[quantize] max_float_nodes must be an integer ≥ 0, got {self.max_float_nodes!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"[quantize] percentile must be in (50, 100], got {self.percentile}")
        if isinstance(self.op_types, str) or not all(isinstance(t, str) for t in self.op_types):
            raise ConfigError(f"[quantize] op_types must be a list of op type names, got {self.op_types!r}")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        unknown = sorted(set(self.op_types) - set(_ort_op_types())) if self.op_types else []
        if unknown:
            raise ConfigError(
                f"[quantize] op_types {unknown} cannot be quantized by ONNX Runtime; valid: {_ort_op_types()}"
            )

    def quantized_op_types(self) -> list[str]:
        """The op types handed to ONNX Runtime (``op_types`` or ORT's full list)."""
        return list(self.op_types) or _ort_op_types()


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    try:
        return cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        valid = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"[quantize] {name}={value!r} is not valid; valid: {valid}") from None


@dataclass(frozen=True)
class FloatNode:
    """A node kept in float and why.

    Args:
        name: the node name in the float graph.
        op_type: its op type.
        reason: ``"keep_float"`` (asked by the config) or ``"accuracy"`` (chosen by the loop).
        drift_alone: for ``"accuracy"``: drift with this node alone quantized (its sensitivity, cycles).
        delta_rmse_alone: for ``"accuracy"``: ΔRMSE with this node alone quantized (cycles).
        delta_rmse_after: for ``"accuracy"``: ΔRMSE once this node (and those before it) stayed float.
    """

    name: str
    op_type: str
    reason: str
    drift_alone: float | None = None
    delta_rmse_alone: float | None = None
    delta_rmse_after: float | None = None


@dataclass(frozen=True)
class Sensitivity:
    """The error of quantizing one node alone (everything else float), in cycles.

    Args:
        drift: RMSE between the predictions of that model and of the float model.
        delta_rmse: its validation RMSE minus the float model's.
    """

    drift: float
    delta_rmse: float


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` wrote and measured (RMSEs on the validation windows, in cycles).

    Args:
        path: the quantized QDQ model.
        method: calibration method used.
        calibration_windows: windows the ranges were measured on.
        rmse_fp32: RMSE of the float model.
        rmse_int8: RMSE of the quantized model.
        drift: RMSE between the quantized and the float model's predictions.
        delta_rmse_initial: ΔRMSE with everything but ``keep_float`` quantized.
        drift_initial: drift with everything but ``keep_float`` quantized.
        budget: the accuracy budget (ΔRMSE).
        float_nodes: nodes kept in float, in the order they were chosen.
        sensitivity: node name → :class:`Sensitivity`, when the loop measured it (most sensitive first).
        ops: op type → count of the quantized graph.
        quantizations: how many graphs were quantized and evaluated.
        seconds: wall time.
    """

    path: Path
    method: CalibrationMethod
    calibration_windows: int
    rmse_fp32: float
    rmse_int8: float
    drift: float
    delta_rmse_initial: float
    drift_initial: float
    budget: float
    float_nodes: tuple[FloatNode, ...]
    sensitivity: dict[str, Sensitivity]
    ops: dict[str, int]
    quantizations: int
    seconds: float

    @property
    def delta_rmse(self) -> float:
        """RMSE of the quantized model minus the float model's (may be < 0)."""
        return self.rmse_int8 - self.rmse_fp32

    @property
    def within_budget(self) -> bool:
        return abs(self.delta_rmse) <= self.budget

    @property
    def quantize_nodes(self) -> int:
        return self.ops.get("QuantizeLinear", 0)

    @property
    def dequantize_nodes(self) -> int:
        return self.ops.get("DequantizeLinear", 0)

    def to_record(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "calibration_windows": self.calibration_windows,
            "rmse_fp32_val": self.rmse_fp32,
            "rmse_int8_val": self.rmse_int8,
            "delta_rmse": self.delta_rmse,
            "drift_rmse": self.drift,
            "delta_rmse_all_quantized": self.delta_rmse_initial,
            "drift_rmse_all_quantized": self.drift_initial,
            "accuracy_budget": self.budget,
            "within_budget": self.within_budget,
            "kept_float": [{k: v for k, v in vars(n).items() if v is not None} for n in self.float_nodes],
            "sensitivity": {k: vars(v) for k, v in self.sensitivity.items()},
            "quantize_linear": self.quantize_nodes,
            "dequantize_linear": self.dequantize_nodes,
            "ops": self.ops,
            "quantizations": self.quantizations,
            "seconds": self.seconds,
        }


def quantize(
    model_path: Path,
    out_path: Path,
    config: QuantizeConfig,
    calibration: CalibrationReader | Iterable[dict[str, np.ndarray]],
    *,
    val_x: np.ndarray,
    val_y: np.ndarray,
    threads: int | None = 1,
) -> QuantizeResult:
    """Quantize the float model at ``model_path`` to INT8 QDQ at ``out_path`` within an accuracy budget.

    Args:
        model_path: the float ONNX model (best after the fuse pass).
        out_path: where the quantized model goes.
        config: the settings.
        calibration: training windows (e.g. :class:`WindowReader`); at least 64 windows.
        val_x: validation windows, ``(n, window, nodes)`` float32 (the budget's data).
        val_y: validation targets (capped RUL, cycles), ``(n,)``.
        threads: ONNX Runtime intra-op threads for calibration and evaluation (default: 1).

    Returns:
        :class:`QuantizeResult`; check ``within_budget`` (the loop stops at ``max_float_nodes``).

    Raises:
        ConfigError: too few calibration windows, no validation windows, a ``keep_float``
            name that is not a node of the model.
        ExportError: ONNX Runtime could not quantize or run the model.
    """
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    val_x = np.ascontiguousarray(val_x, np.float32)
    val_y = np.asarray(val_y, np.float64).reshape(-1)
    if len(val_x) == 0 or len(val_x) != len(val_y):
        raise ConfigError(
            f"[quantize] the accuracy budget needs validation windows and targets, got {len(val_x)} and {len(val_y)}",
            hint="prepare the data with a validation split (val_fraction > 0)",
        )
    model = onnx.load(str(model_path))
    nodes = {n.name: n.op_type for n in model.graph.node}
    unknown = [n for n in config.keep_float if n not in nodes]
    if unknown:
        raise ConfigError(
            f"[quantize] keep_float names nodes not in {model_path.name}: {unknown}",
            hint=f"node names of this graph: {sorted(nodes)[:40]}",
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeglm-quant-") as tmp:
        cache, n_calib = _calibrate(model_path, calibration, config, Path(tmp), threads)
        float_pred = _predict(_session(model_path, threads), val_x)
        rmse_fp32 = rmse(float_pred, val_y)
        runs = 0

        def measure(keep: Sequence[str], path: Path) -> tuple[float, float]:
            """(ΔRMSE, drift) of the model quantized with ``keep`` in float, written to ``path``."""
            nonlocal runs
            runs += 1
            _quantize_static(model_path, path, config, cache, keep)
            pred = _predict(_session(path, threads), val_x)
            return rmse(pred, val_y) - rmse_fp32, rmse(pred, float_pred)

        keep = list(config.keep_float)
        float_nodes = [FloatNode(n, nodes[n], "keep_float") for n in keep]
        d0, drift0 = measure(keep, out_path)
        d_now, drift_now = d0, drift0
        sensitivity: dict[str, Sensitivity] = {}
        if abs(d0) > config.accuracy_budget and config.max_float_nodes > 0:
            probe = Path(tmp) / "probe.onnx"
            candidates = _quantized_nodes(onnx.load(str(out_path)), exclude=set(keep))
            for n in candidates:
                d_n, drift_n = measure([m for m in candidates if m != n] + keep, probe)
                sensitivity[n] = Sensitivity(drift=drift_n, delta_rmse=d_n)
            sensitivity = dict(sorted(sensitivity.items(), key=lambda kv: -kv[1].drift))
            for n, sens in list(sensitivity.items())[: config.max_float_nodes]:
                if sens.drift <= 0:
                    break
                keep.append(n)
                d_now, drift_now = measure(keep, probe)
                float_nodes.append(FloatNode(n, nodes[n], "accuracy", sens.drift, sens.delta_rmse, d_now))
                if abs(d_now) <= config.accuracy_budget:
                    break
            if len(keep) > len(config.keep_float):
                probe.replace(out_path)
    return QuantizeResult(
        path=out_path,
        method=config.method,
        calibration_windows=n_calib,
        rmse_fp32=rmse_fp32,
        rmse_int8=rmse_fp32 + d_now,
        drift=drift_now,
        delta_rmse_initial=d0,
        drift_initial=drift0,
        budget=config.accuracy_budget,
        float_nodes=tuple(float_nodes),
        sensitivity=sensitivity,
        ops=op_counts(onnx.load(str(out_path))),
        quantizations=runs,
        seconds=time.perf_counter() - started,
    )


@register_pass(QuantizeConfig)
def _run_quantize(stage: Stage, config: QuantizeConfig, ctx: PassContext) -> PassResult:
    if not stage.is_onnx or stage.onnx_path is None:
        raise ConfigError(
            f"[quantize] stage {stage.name!r} is a torch model; quantize works on the exported ONNX graph",
            hint="put an [export] pass (and best a [fuse] pass) before [quantize] in the recipe",
        )
    train_x = getattr(getattr(ctx.prepared, "train", None), "x", None)
    if train_x is None or len(train_x) < MIN_CALIBRATION_WINDOWS:
        found = 0 if train_x is None else len(train_x)
        raise ConfigError(
            f"[quantize] calibration needs ≥ {MIN_CALIBRATION_WINDOWS} training windows, found {found}",
            hint="use more training units or a shorter window",
        )
    reader = WindowReader(train_x, limit=config.calibration_size)
    out = Path(ctx.workdir) / f"{stage.name}-int8.onnx"
    result = quantize(
        stage.onnx_path, out, config, reader, val_x=ctx.prepared.val.x, val_y=ctx.prepared.val.y, threads=ctx.threads
    )
    if not result.within_budget:
        raise ConfigError(
            f"[quantize] validation |ΔRMSE| {abs(result.delta_rmse):.3f} exceeds "
            f"accuracy_budget={config.accuracy_budget} with {len(result.float_nodes)} node(s) kept in float "
            f"(max_float_nodes={config.max_float_nodes})",
            hint="raise max_float_nodes or accuracy_budget, or try another calibration method",
        )
    return PassResult(
        stage=Stage(name="int8", onnx_path=result.path, architecture=stage.architecture), record=result.to_record()
    )


# -- ONNX Runtime plumbing -----------------------------------------------------------------------


#: Windows per ``collect_data`` call: ORT's histogram calibrators keep every intermediate
#: tensor of a call in memory (≈ 2 MB per window for a 16-channel STGNN) before binning it.
_CALIBRATION_CHUNK = 64
_CALIBRATION_MAX_BATCH = 32


class _ArrayReader:
    """ORT ``CalibrationDataReader`` (``get_next``) over in-memory arrays, in batches of one size."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int) -> None:
        n = len(next(iter(arrays.values())))
        self._batches = iter([{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _gather(calibration: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All calibration inputs, concatenated per input name (calibration sets are small: 512 windows ≈ 1 MB)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in calibration:
        for k, v in batch.items():
            parts.setdefault(k, []).append(np.ascontiguousarray(v, np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _uniform_batch(n: int) -> int:
    """Largest batch ≤ 32 that divides ``n``: ORT's histogram calibrators fail on batches of mixed sizes."""
    return max(b for b in range(1, min(n, _CALIBRATION_MAX_BATCH) + 1) if n % b == 0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice through the root logger and prints calibration progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _calibrate(
    model_path: Path,
    calibration: Iterable[dict[str, np.ndarray]],
    config: QuantizeConfig,
    tmp: Path,
    threads: int | None,
) -> tuple[Path, int]:
    """Run ORT's calibrator once and cache the ranges (JSON) for every later ``quantize_static``."""
    import onnxruntime as ort
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    extra: dict[str, Any] = {
        CalibrationMethod.MINMAX: {},
        CalibrationMethod.PERCENTILE: {"num_bins": 2048, "percentile": config.percentile, "symmetric": False},
        CalibrationMethod.ENTROPY: {"num_bins": 2048, "num_quantized_bins": 128, "symmetric": False},
    }[config.method]
    arrays = _gather(calibration)
    n = len(next(iter(arrays.values()))) if arrays else 0
    if n < MIN_CALIBRATION_WINDOWS:
        raise ConfigError(
            f"[quantize] calibration set too small: {n} windows, need ≥ {MIN_CALIBRATION_WINDOWS}",
            hint="calibrate on more training windows, e.g. WindowReader(prepared.train.x, limit=512)",
        )
    batch = _uniform_batch(n)
    chunk = batch * max(1, _CALIBRATION_CHUNK // batch)
    try:
        with _quiet():
            calibrator = create_calibrator(
                model_path,
                config.quantized_op_types(),
                augmented_model_path=str(tmp / "augmented.onnx"),
                calibrate_method=config.method.to_ort(),
                extra_options=extra,
            )
            # The calibrator opens its session with all cores; reopen it with ours.
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads = threads or 0
            opts.log_severity_level = 3
            calibrator.infer_session = ort.InferenceSession(
                calibrator.augmented_model_path, opts, providers=["CPUExecutionProvider"]
            )
            for start in range(0, n, chunk):
                calibrator.collect_data(_ArrayReader({k: v[start : start + chunk] for k, v in arrays.items()}, batch))
            ranges = calibrator.compute_data()
    except Exception as exc:  # ORT raises ValueError, RuntimeError, Fail…
        raise ExportError(f"ONNX Runtime calibration of {model_path} failed: {exc}") from exc
    cache = tmp / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache, n


def _ort_op_types() -> list[str]:
    """Op types ORT quantizes in QDQ format (its own default list)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def _quantize_static(model_path: Path, out: Path, config: QuantizeConfig, cache: Path, keep: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    try:
        with _quiet():
            quantize_static(
                str(model_path),
                str(out),
                calibration_data_reader=None,
                calibration_cache_path=str(cache),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=config.quantized_op_types(),
                per_channel=config.per_channel,
                activation_type=config.activation_type.to_ort(),
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(keep),
                calibrate_method=config.method.to_ort(),
            )
    except Exception as exc:  # ORT raises ValueError, RuntimeError…
        raise ExportError(f"ONNX Runtime could not quantize {model_path}: {exc}") from exc


def _quantized_nodes(qmodel: onnx.ModelProto, *, exclude: set[str]) -> list[str]:
    """Names of the nodes that read a dequantized tensor (the quantized ops), in graph order."""
    dq_outputs = {o for n in qmodel.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [
        n.name
        for n in qmodel.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and n.name not in exclude
        and any(i in dq_outputs for i in n.input)
    ]


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def _predict(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + _EVAL_BATCH]})[0].reshape(-1) for i in range(0, len(x), _EVAL_BATCH)]
    return np.concatenate(out).astype(np.float64)
