"""Training and evaluation of the reference models (torch).

The protocol is the standard one for RUL prognostics: windows of ``window`` cycles,
targets capped at ``rul_cap``, a validation split *by unit* (no unit contributes
windows to both sides), early stopping on validation RMSE, and the test metric on
the last window of every test unit.

Loss: mean squared error on the scaled target ``y / rul_cap`` (the model outputs
cycles; dividing keeps the loss O(1)). Optimiser: AdamW, learning rate warmed up
linearly over the first 10 % of steps then decayed by a cosine over ``epochs``; the
weights of the best validation epoch are restored.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeglm.checkpoint import Checkpoint, save_checkpoint
from edgeglm.data.source import DataSource, load_source, parse_source
from edgeglm.data.table import Dataset
from edgeglm.errors import ConfigError
from edgeglm.graph import SensorGraph
from edgeglm.metrics import phm08_score, rmse
from edgeglm.models import GraphMode, MLPConfig, ModelConfig, STGNNConfig, build_model, count_parameters
from edgeglm.windowing import Windows, WindowSpec, fit_window_spec

__all__ = [
    "MODEL_PRESETS",
    "Prepared",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
    "predict",
    "prepare",
    "prepare_from_checkpoint",
    "train_from_source",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Args:
        epochs: maximum epochs (default: 60).
        batch_size: windows per step (default: 256).
        lr: peak learning rate (default: 2e-3).
        weight_decay: AdamW weight decay (default: 1e-4).
        patience: epochs without validation improvement before stopping (default: 12).
        seed: seeds torch and numpy for weights, shuffling and dropout (default: 0).
        threads: torch intra-op threads (default: all cores).
    """

    epochs: int = 60
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 12
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train: {name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train: lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    """History of one :func:`fit` run."""

    best_epoch: int
    best_val_rmse: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """A data set turned into model-ready windows.

    ``spec`` is fitted on the training units only; ``val_units`` are held out of them.
    """

    dataset: Dataset
    spec: WindowSpec
    graph: SensorGraph
    train: Windows
    val: Windows
    test: Windows
    val_units: tuple[int, ...]


#: Named architectures for the CLI (``--model``). The teacher is the default.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "stgnn": {"kind": "stgnn", "channels": 16, "blocks": 3, "head_hidden": 64},
    "stgnn-small": {"kind": "stgnn", "channels": 8, "blocks": 2, "head_hidden": 32},
    "mlp": {"kind": "mlp", "hidden": (128, 64)},
}


def prepare(
    dataset: Dataset,
    *,
    window: int = 30,
    rul_cap: float = 125.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    conditions: int | str = "auto",
) -> Prepared:
    """Split train units into train/val, fit the window spec on train, build the graph.

    The graph is the data set's ground truth when it has one, else a correlation graph
    (k = 3 nearest by |ρ|) on the training units.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    units = dataset.train.units
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(units) * val_fraction))
    val_units = tuple(sorted(int(u) for u in rng.choice(units, n_val, replace=False)))
    train_t = dataset.train.take(~np.isin(dataset.train.unit, val_units))
    val_t = dataset.train.select_units(val_units)
    spec = fit_window_spec(train_t, window=window, rul_cap=rul_cap, conditions=conditions)  # type: ignore[arg-type]
    if dataset.graph_edges is not None:
        graph = SensorGraph.from_edges(spec.sensor_names, dataset.graph_edges)
    else:
        graph = SensorGraph.from_correlation(spec.sensor_names, spec.normalize(train_t))
    return Prepared(
        dataset=dataset,
        spec=spec,
        graph=graph,
        train=spec.windows(train_t),
        val=spec.windows(val_t),
        test=spec.last_windows(dataset.test),
        val_units=val_units,
    )


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """RUL predictions in cycles. Shapes: ``(n, window, nodes)`` → ``(n,)``."""
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])).reshape(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def evaluate(model: nn.Module, windows: Windows) -> dict[str, float]:
    """``{"rmse", "score", "n"}`` of ``model`` on ``windows`` (targets already capped)."""
    p = predict(model, windows.x)
    return {"rmse": rmse(p, windows.y), "score": phm08_score(p, windows.y), "n": len(windows)}


def fit(
    model: nn.Module,
    train: Windows,
    val: Windows,
    config: TrainConfig,
    *,
    rul_cap: float = 125.0,
    progress: bool = True,
    description: str = "train",
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place with early stopping; the best validation weights are restored.

    Args:
        loss_fn: ``(model, x, y) → loss``; default MSE on ``y / rul_cap`` (used by distillation).
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(config.epochs * steps_per_epoch))
    mse = nn.MSELoss()

    def default_loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return mse(m(xb).reshape(-1) / rul_cap, yb / rul_cap)

    loss_of = loss_fn or default_loss
    best_state, best_rmse, best_epoch = copy.deepcopy(model.state_dict()), math.inf, 0
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(description, total=config.epochs, status="") if bar else None
        epoch = 0
        for epoch in range(1, config.epochs + 1):
            model.train()
            perm = torch.randperm(len(train), generator=gen)
            total = 0.0
            for i in range(0, len(perm), config.batch_size):
                idx = perm[i : i + config.batch_size]
                loss = loss_of(model, x_all[idx], y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            val_rmse = evaluate(model, val)["rmse"]
            history.append({"epoch": epoch, "train_loss": total / len(train), "val_rmse": val_rmse})
            if val_rmse < best_rmse - 1e-4:
                best_rmse, best_epoch = val_rmse, epoch
                best_state = copy.deepcopy(model.state_dict())
            if bar is not None:
                bar.update(task, advance=1, status=f"val RMSE {val_rmse:6.2f}  best {best_rmse:6.2f}@{best_epoch}")
            if epoch - best_epoch >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch, best_rmse, epoch, time.perf_counter() - started, history)


def _warmup_cosine(total_steps: int, warmup_fraction: float = 0.1, floor: float = 0.01) -> Callable[[int], float]:
    """LR factor: linear warm-up over the first 10 % of steps, then cosine decay to ``floor``.
    Well defined for any ``total_steps ≥ 1`` (fine-tuning runs can be a handful of steps)."""
    warm = max(1, int(warmup_fraction * total_steps))
    decay = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / decay)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _progress(enabled: bool):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        transient=False,
    )


def make_model_config(preset: str | dict[str, Any], prepared: Prepared, graph_mode: str | None = None) -> ModelConfig:
    """Model config for a preset name (see :data:`MODEL_PRESETS`) sized to the prepared data."""
    fields = dict(MODEL_PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    if isinstance(preset, str) and preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    kind = fields.pop("kind")
    common = {
        "num_nodes": prepared.spec.num_sensors,
        "window": prepared.spec.window,
        "rul_cap": prepared.spec.rul_cap,
    }
    if kind == "stgnn":
        if graph_mode is not None:
            fields["graph"] = GraphMode(graph_mode)
        return STGNNConfig(**common, **fields)
    return MLPConfig(**common, **fields)


def train_from_source(
    source: DataSource | str,
    out: Path | None,
    *,
    model: str = "stgnn",
    graph_mode: str | None = None,
    window: int = 30,
    train_config: TrainConfig | None = None,
    subset: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Checkpoint | None, dict[str, Any]]:
    """Load data, train one model, evaluate on the test protocol and (if ``out``) save a checkpoint.

    Returns the trained model, the checkpoint (or None) and the metrics dict.
    """
    cfg = train_config or TrainConfig()
    src = parse_source(source, subset=subset) if isinstance(source, str) else source
    dataset = load_source(src)
    prepared = prepare(dataset, window=window, seed=cfg.seed, conditions=src.conditions)
    mcfg = make_model_config(model, prepared, graph_mode)
    torch.manual_seed(cfg.seed)
    net = build_model(mcfg, prepared.graph.normalized())
    result = fit(
        net,
        prepared.train,
        prepared.val,
        cfg,
        rul_cap=prepared.spec.rul_cap,
        progress=progress,
        description=f"train {model} on {dataset.name}",
    )
    test = evaluate(net, prepared.test)
    metrics = {
        "data": dataset.name,
        "model": model,
        "params": count_parameters(net),
        "val_rmse": result.best_val_rmse,
        "test_rmse": test["rmse"],
        "test_score": test["score"],
        "test_units": test["n"],
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
        "train_windows": len(prepared.train),
        "history": result.history,
    }
    ckpt = None
    if out is not None:
        data = {
            "source": str(src),
            "name": dataset.name,
            "val_units": list(prepared.val_units),
            "seed": cfg.seed,
        }
        ckpt = save_checkpoint(
            out,
            net,
            model_config=mcfg,
            window_spec=prepared.spec,
            graph=prepared.graph,
            data=data,
            metrics=metrics,
        )
    return net, ckpt, metrics


def prepare_from_checkpoint(checkpoint: Checkpoint, dataset: Dataset) -> Prepared:
    """Windows of ``dataset`` exactly as the checkpoint's model saw them in training:
    its window spec (normalization fitted then), its graph and its validation units.

    Raises:
        CheckpointError: the data lacks sensors the checkpoint was trained on.
    """
    from edgeglm.errors import CheckpointError

    spec = checkpoint.window_spec
    missing = [s for s in spec.sensor_names if s not in dataset.train.sensor_names]
    if missing:
        raise CheckpointError(
            f"data {dataset.source!r} lacks sensors {missing} that checkpoint {checkpoint.path} was trained on",
            hint="use the data source recorded in the checkpoint (omit --data)",
        )
    val_units = tuple(int(u) for u in checkpoint.data.get("val_units", ()))
    train_t = dataset.train.take(~np.isin(dataset.train.unit, val_units))
    return Prepared(
        dataset=dataset,
        spec=spec,
        graph=checkpoint.graph,
        train=spec.windows(train_t),
        val=spec.windows(dataset.train.select_units(val_units)),
        test=spec.last_windows(dataset.test),
        val_units=val_units,
    )
