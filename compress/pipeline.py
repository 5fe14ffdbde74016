"""Run a recipe on a checkpoint: pass after pass, measuring every stage, then export and report.

After every stage the runner measures, the same way for all stages:

- accuracy: RMSE and PHM08 score on the validation units and on the test protocol
  (last window per test unit);
- size: the ONNX file's bytes and its zstd-compressed bytes (what an OTA update sends);
- latency: ONNX Runtime on one CPU thread, batch 1 and batch 64, median of ``latency_runs``.

A torch stage is exported to a scratch ONNX file for these measurements, so a pruned
torch model and the final INT8 file are compared on equal terms.

Output folder::

    OUT/
      model.onnx          the final model (standard ONNX ops; INT8 QDQ when quantized)
      window_spec.json    how rows become windows (from the checkpoint)
      graph.json          the sensor graph (from the checkpoint)
      compress.json       recipe, source checkpoint, precision, final accuracy (what `edgeglm build` reads)
      golden_windows.npy  a few real validation windows: the bundle's golden inputs
      torch_model/        the last torch stage (before export) as a checkpoint folder, its config
                          holding the pruned widths: what LiteRT conversion starts from
      calibration_windows.npy  training windows that calibrate LiteRT's INT8 conversion
      report.json / report.md / report.png
      stages/             intermediate files
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeglm.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from edgeglm.compress.export import ExportConfig, export_onnx
from edgeglm.compress.measure import OnnxModel, file_sizes
from edgeglm.compress.passes import PassContext, Stage, run_pass
from edgeglm.compress.recipe import Recipe, load_recipe
from edgeglm.data.source import load_source
from edgeglm.errors import CheckpointError, ConfigError, ExportError
from edgeglm.training import Prepared, prepare_from_checkpoint

__all__ = ["TORCH_MODEL_DIR", "CompressionRun", "StageMetrics", "compress_checkpoint", "measure_stage"]

MIN_CALIBRATION_WINDOWS = 64
TORCH_MODEL_DIR = "torch_model"


@dataclass
class StageMetrics:
    """What the runner measured for one stage (see the module docstring)."""

    name: str
    pass_kind: str
    architecture: str
    val_rmse: float
    test_rmse: float
    test_score: float
    size_bytes: int
    zstd_bytes: int
    latency_b1_ms: float
    latency_b64_ms: float
    params: int | None
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionRun:
    """The result of :func:`compress_checkpoint`."""

    out: Path
    recipe: Recipe
    checkpoint: Path
    stages: list[StageMetrics]
    model_path: Path
    seconds: float

    @property
    def first(self) -> StageMetrics:
        return self.stages[0]

    @property
    def final(self) -> StageMetrics:
        return self.stages[-1]

    def summary(self) -> dict[str, Any]:
        a, b = self.first, self.final
        return {
            "rmse_fp32": a.test_rmse,
            "rmse_int8": b.test_rmse,
            "delta_rmse": b.test_rmse - a.test_rmse,
            "score_fp32": a.test_score,
            "score_int8": b.test_score,
            "size_fp32": a.size_bytes,
            "size_int8": b.size_bytes,
            "size_ratio": a.size_bytes / b.size_bytes,
            "zstd_fp32": a.zstd_bytes,
            "zstd_int8": b.zstd_bytes,
            "latency_b1_ms_fp32": a.latency_b1_ms,
            "latency_b1_ms_int8": b.latency_b1_ms,
            "latency_b64_ms_fp32": a.latency_b64_ms,
            "latency_b64_ms_int8": b.latency_b64_ms,
            "speedup_b1": a.latency_b1_ms / b.latency_b1_ms,
            "speedup_b64": a.latency_b64_ms / b.latency_b64_ms,
            "seconds": self.seconds,
        }


def _count_params(stage: Stage) -> int | None:
    if stage.torch_model is None:
        return None
    return sum(p.numel() for p in stage.torch_model.parameters())


def measure_stage(
    stage: Stage, prepared: Prepared, scratch: Path, *, latency_runs: int = 200
) -> tuple[Path, dict[str, float]]:
    """Export (if torch) and measure a stage; returns its ONNX path and the figures."""
    spec = prepared.spec
    if stage.onnx_path is not None:
        path = stage.onnx_path
    else:
        assert stage.torch_model is not None
        path = scratch / f"{stage.name}.measure.onnx"
        export_onnx(
            stage.torch_model, path, window=spec.window, num_nodes=spec.num_sensors, check_input=prepared.val.x[:64]
        )
    model = OnnxModel(path, threads=1)
    val = model.accuracy(prepared.val.x, prepared.val.y)
    test = model.accuracy(prepared.test.x, prepared.test.y)
    sample = prepared.val.x[:64]
    b1 = model.latency(sample, batch=1, runs=latency_runs)
    b64 = model.latency(sample, batch=64, runs=latency_runs)
    figures = {
        "val_rmse": val["rmse"],
        "test_rmse": test["rmse"],
        "test_score": test["score"],
        **file_sizes(path),
        "latency_b1_ms": b1.median_ms,
        "latency_b64_ms": b64.median_ms,
    }
    return path, figures


def _check_recipe_matches(recipe: Recipe, ckpt: Checkpoint, prepared: Prepared) -> None:
    kind = ckpt.model_config.kind
    if recipe.model is not None and recipe.model != kind:
        raise CheckpointError(
            f"recipe {recipe.name!r} is for {recipe.model!r} models but checkpoint {ckpt.path} holds a {kind!r}",
            hint="pick a recipe for this model or drop `model` from the recipe's [recipe] table",
        )
    if len(prepared.train) < MIN_CALIBRATION_WINDOWS and any(p.kind == "quantize" for p in recipe.passes):
        raise ConfigError(
            f"only {len(prepared.train)} training windows for INT8 calibration; at least "
            f"{MIN_CALIBRATION_WINDOWS} are needed",
            hint="use more training units or a shorter window, or drop the quantize pass",
        )


def compress_checkpoint(
    checkpoint: Path | str | Checkpoint,
    out: Path,
    *,
    recipe: Recipe | Path | str | None = None,
    data: str | None = None,
    seed: int = 0,
    progress: bool = True,
    latency_runs: int = 200,
    log=print,
) -> CompressionRun:
    """Run ``recipe`` (default: the shipped one) on a checkpoint and write ``out`` (see module doc)."""
    started = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dataset = load_source(data or ckpt.source)
    prepared = prepare_from_checkpoint(ckpt, dataset)
    _check_recipe_matches(rec, ckpt, prepared)
    out = Path(out)
    workdir = out / "stages"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    teacher = load_model(ckpt)
    ctx = PassContext(prepared=prepared, teacher=teacher, workdir=workdir, seed=seed, progress=progress)

    passes = list(rec.passes)
    if not any(p.kind == "export" for p in passes):
        first_onnx = next((i for i, p in enumerate(passes) if p.kind in ("fuse", "quantize")), len(passes))
        passes.insert(first_onnx, ExportConfig())

    stage = Stage("teacher", torch_model=teacher, architecture=ckpt.model_config.kind)
    last_torch = stage
    stages: list[StageMetrics] = []

    def record(st: Stage, kind: str, rec_: dict[str, Any], seconds: float) -> None:
        _, fig = measure_stage(st, prepared, workdir, latency_runs=latency_runs)
        m = StageMetrics(
            name=st.name,
            pass_kind=kind,
            architecture=st.architecture,
            params=_count_params(st),
            seconds=seconds,
            record=rec_,
            **fig,
        )  # type: ignore[arg-type]
        stages.append(m)
        log(
            f"  {m.name:<10} val RMSE {m.val_rmse:6.2f}  test RMSE {m.test_rmse:6.2f}  "
            f"{m.size_bytes / 1024:8.1f} KiB  b1 {m.latency_b1_ms * 1000:7.0f} µs  b64 {m.latency_b64_ms:6.2f} ms"
        )

    log(f"compress {ckpt.path} with recipe {rec.name!r}: " + " → ".join(p.kind for p in passes))
    record(stage, "checkpoint", {}, 0.0)
    for i, cfg in enumerate(passes, start=1):
        t0 = time.perf_counter()
        result = run_pass(stage, cfg, ctx)
        name = _stage_name(cfg.kind, i, stages)
        stage = Stage(name, result.stage.torch_model, result.stage.onnx_path, result.stage.architecture)
        if stage.torch_model is not None:
            last_torch = stage
        rec_ = {"config": cfg.to_dict(), **result.record}
        if cfg.kind == "export":  # measured as part of the next stage; nothing changes numerically
            continue
        record(stage, cfg.kind, rec_, time.perf_counter() - t0)
    if stage.onnx_path is None:
        t0 = time.perf_counter()
        stage = run_pass(stage, ExportConfig(), ctx).stage
    final = out / "model.onnx"
    shutil.copyfile(stage.onnx_path, final)
    (out / "window_spec.json").write_text(json.dumps(ckpt.window_spec.to_dict(), indent=2))
    (out / "graph.json").write_text(json.dumps(ckpt.graph.to_dict(), indent=2))
    golden = golden_windows(prepared)
    np.save(out / GOLDEN_FILE, golden)
    np.save(out / CALIBRATION_FILE, calibration_windows(prepared, seed=seed))
    _save_torch_stage(last_torch, out / TORCH_MODEL_DIR, ckpt, golden, stages)
    quantized = any(p.kind == "quantize" for p in passes)
    last = stages[-1] if stages else None
    (out / "compress.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "recipe": rec.name,
                "passes": [p.kind for p in passes],
                "checkpoint": str(ckpt.path),
                "source": ckpt.source,
                "model_name": Path(str(ckpt.path)).name,
                "architecture": stage.architecture,
                "precision": "int8" if quantized else "fp32",
                "model": final.name,
                "golden_windows": GOLDEN_FILE,
                "test_rmse": None if last is None else last.test_rmse,
                "val_rmse": None if last is None else last.val_rmse,
            },
            indent=2,
        )
    )
    run = CompressionRun(
        out=out,
        recipe=rec,
        checkpoint=ckpt.path,
        stages=stages,
        model_path=final,
        seconds=time.perf_counter() - started,
    )
    from edgeglm.compress.report import write_report

    write_report(run, data_name=dataset.name)
    return run


GOLDEN_FILE = "golden_windows.npy"
CALIBRATION_FILE = "calibration_windows.npy"


def calibration_windows(prepared: Prepared, count: int = 256, *, seed: int = 0) -> np.ndarray:
    """``count`` training windows drawn at random (``seed``): what post-training quantization
    outside this pipeline (LiteRT's PT2E INT8, at build time) calibrates on. Never test windows."""
    x = prepared.train.x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=min(count, len(x)), replace=False))
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def golden_windows(prepared: Prepared, count: int = 8) -> np.ndarray:
    """``count`` validation windows spread evenly over the validation set (never the test set).

    They become a bundle's golden inputs: the device runs them after installing and must
    reproduce the reference outputs recorded at build time.
    """
    x = prepared.val.x if len(prepared.val) else prepared.train.x
    idx = np.linspace(0, len(x) - 1, num=min(count, len(x))).round().astype(int)
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def _save_torch_stage(
    stage: Stage, folder: Path, ckpt: Checkpoint, golden: np.ndarray, stages: list[StageMetrics]
) -> None:
    """Write the last torch stage as a checkpoint folder and prove that it reloads unchanged.

    The config comes from the model's layers (``layer_config()``), not from the config it was
    built with: structured pruning narrowed the layers, and ``weights.pt`` only loads into a
    model of the same widths. Reloaded with :func:`load_model`, the model must give the stage's
    outputs on the golden windows, else the folder is useless to a converter and compress fails.
    """
    import torch

    model = stage.torch_model
    assert model is not None
    if folder.exists():
        shutil.rmtree(folder)
    measured = next((m for m in reversed(stages) if m.name == stage.name), None)
    metrics = {"stage": stage.name, "architecture": stage.architecture}
    if measured is not None:
        metrics.update({"val_rmse": measured.val_rmse, "test_rmse": measured.test_rmse, "params": measured.params})
    save_checkpoint(
        folder,
        model,
        model_config=model.layer_config(),  # type: ignore[operator]
        window_spec=ckpt.window_spec,
        graph=ckpt.graph,
        data=ckpt.data,
        metrics=metrics,
    )
    x = torch.from_numpy(golden)
    with torch.no_grad():
        want = model.eval()(x).numpy()
        got = load_model(folder)(x).numpy()
    err = float(np.max(np.abs(got - want)))
    if not err <= 1e-5 * max(1.0, float(np.max(np.abs(want)))):
        raise ExportError(
            f"{folder} does not reproduce the {stage.name!r} stage it was saved from (max |Δ| {err:.3g})",
            hint="the model's layer_config() misses a width the stage changed; report this as a bug",
        )


def _stage_name(kind: str, index: int, stages: list[StageMetrics]) -> str:
    names = {"prune": "pruned", "distill": "student", "fuse": "fused", "quantize": "int8", "export": "exported"}
    base = names.get(kind, kind)
    taken = {s.name for s in stages}
    return base if base not in taken else f"{base}{index}"
