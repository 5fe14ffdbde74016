"""Export a trained model to a portable ONNX graph (dynamo exporter, dynamic batch)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeglm.errors import ExportError

__all__ = ["FORBIDDEN_OPS", "INPUT_NAME", "OUTPUT_NAME", "ExportConfig", "ExportResult", "export_onnx", "op_counts"]

INPUT_NAME = "window"
OUTPUT_NAME = "rul"
DEFAULT_OPSET = 18

#: Sparse message-passing ops that TensorRT, LiteRT conversion or the INT8 quantizer do not
#: handle well; a sensor-graph model must export as dense MatMul instead.
FORBIDDEN_OPS = frozenset({"ScatterElements", "ScatterND", "GatherND", "NonZero", "Scatter", "GatherElements"})


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Args:
        path: the ONNX file.
        opset: the default-domain opset the graph declares.
        ops: op type → count over the main graph.
        max_abs_diff: largest |ONNX Runtime − torch| on the check input.
    """

    path: Path
    opset: int
    ops: dict[str, int]
    max_abs_diff: float


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count node op types of the main graph (sorted by name)."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    window: int,
    num_nodes: int,
    opset: int = DEFAULT_OPSET,
    check_input: np.ndarray | None = None,
    atol: float = 1e-5,
) -> ExportResult:
    """Export ``model`` (eval mode) with a dynamic batch axis and check it against torch.

    The graph takes ``window`` of shape ``(batch, window, num_nodes)`` float32 and returns
    ``rul`` of shape ``(batch, 1)``. After export the graph is checked with the ONNX
    checker, scanned for :data:`FORBIDDEN_OPS`, and run with ONNX Runtime on
    ``check_input`` (default: 8 random windows); outputs must match torch within
    ``atol · max(1, max|output|)`` (relative for outputs in cycles, absolute near zero).

    Raises:
        ExportError: the exporter failed, a forbidden op is present, or outputs differ.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(2, window, num_nodes)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"torch.onnx.export (dynamo) failed for {type(model).__name__}: {exc}",
            hint="the model must be traceable with static shapes except the batch axis",
        ) from exc
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = op_counts(proto)
    bad = sorted(FORBIDDEN_OPS & set(ops))
    if bad:
        raise ExportError(
            f"exported graph of {type(model).__name__} contains sparse ops {bad}",
            hint="fold PyG message passing into dense graph convolutions first (edgeglm.compress.fold)",
        )
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    diff, scale = _compare_with_ort(model, path, window, num_nodes, check_input)
    if diff > atol * scale:
        raise ExportError(
            f"ONNX Runtime output differs from torch by {diff:.3g} (> {atol:g} × {scale:.3g}) for {path}",
            hint="the export changed the model's math; report this with the model config",
        )
    return ExportResult(path=path, opset=int(opset_found), ops=ops, max_abs_diff=diff)


def _compare_with_ort(
    model: nn.Module, path: Path, window: int, num_nodes: int, check_input: np.ndarray | None
) -> tuple[float, float]:
    """``(max |ORT − torch|, max(1, max |torch|))``: outputs are RUL in cycles (up to ~125), where one
    float32 rounding step is ~1e-5, so the tolerance scales with the output magnitude."""
    import onnxruntime as ort

    x = (
        np.asarray(check_input, np.float32)
        if check_input is not None
        else np.random.default_rng(0).standard_normal((8, window, num_nodes)).astype(np.float32)
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    return float(np.max(np.abs(got - want))), max(1.0, float(np.max(np.abs(want))))


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines to stdout and logs; keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


# -- the export pass -----------------------------------------------------------------------------

from dataclasses import dataclass as _dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402

from edgeglm.compress.passes import PassConfig, PassContext, PassResult, Stage, register_pass  # noqa: E402
from edgeglm.errors import ConfigError  # noqa: E402


@_dataclass(frozen=True)
class ExportConfig(PassConfig):
    """Torch → ONNX (dynamo exporter, dynamic batch). The runner inserts it before the first
    ONNX pass when a recipe does not list it.

    Args:
        opset: default-domain opset (default: 18; ≥ 17 for LayerNormalization-era ops).
        atol: max |ORT − torch| allowed on the check input (default: 1e-5).
    """

    kind: ClassVar[str] = "export"
    opset: int = DEFAULT_OPSET
    atol: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 13 <= self.opset <= 23:
            raise ConfigError(f"[export] opset must be in 13..23, got {self.opset}")


@register_pass(ExportConfig)
def _run_export(stage: Stage, config: ExportConfig, ctx: PassContext) -> PassResult:
    if stage.torch_model is None:
        raise ConfigError("[export] the model is already ONNX; list export once, after the torch passes")
    spec = ctx.prepared.spec
    path = ctx.workdir / f"{stage.name}.onnx"
    result = export_onnx(
        stage.torch_model,
        path,
        window=spec.window,
        num_nodes=spec.num_sensors,
        opset=config.opset,
        check_input=ctx.prepared.val.x[:64],
        atol=config.atol,
    )
    record = {"opset": result.opset, "ops": result.ops, "max_abs_diff": result.max_abs_diff}
    return PassResult(Stage(stage.name, onnx_path=path, architecture=stage.architecture), record)
