"""`edgeglm demo`: the main job on the embedded defaults, from nothing, with no network.

Today it runs the part of the pipeline that exists end to end — simulate a factory
line, train the STGNN teacher on it, evaluate on held-out units against a naive
baseline, and write a checkpoint — and grows with the pipeline (compression,
bundles, fleet sync) as those land.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeglm.metrics import rmse

__all__ = ["run_demo"]

QUICK_SOURCE = "factory?seed={seed}&units_train=16&units_test=6"


def run_demo(out: Path, *, quick: bool = False, seed: int = 0) -> int:
    """Run the demo into ``out``; returns a process exit code (0 when every check holds)."""
    from rich.console import Console

    from edgeglm.data.source import load_source
    from edgeglm.training import TrainConfig, predict, train_from_source

    console = Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = QUICK_SOURCE.format(seed=seed) if quick else ("factory" if seed == 0 else f"factory?seed={seed}")
    dataset = load_source(source)
    meta = dataset.meta
    machines = meta.get("machines", [])
    console.print(f"[bold]EdgeGLM demo[/bold] — simulated factory line ({source})")
    if machines:
        console.print(
            "  line:    "
            + " → ".join(f"{m['name']} ({m['kind']})" if isinstance(m, dict) else str(m) for m in machines)
        )
    console.print(
        f"  data:    {len(dataset.train.units)} run-to-failure units ({len(dataset.train)} rows) for "
        f"training, {len(dataset.test.units)} truncated units for test; "
        f"{len(dataset.train.sensor_names)} sensors, {len(dataset.train.setting_names)} settings"
    )
    dropouts = int(np.isnan(dataset.train.sensors).sum())
    console.print(f"  faults:  sensor dropouts in training data: {dropouts} readings (held at last value)")

    config = TrainConfig(epochs=3 if quick else 40, patience=3 if quick else 10, seed=seed)
    model, ckpt, metrics = train_from_source(source, out / "teacher", model="stgnn", train_config=config)
    assert ckpt is not None

    from edgeglm.training import prepare_from_checkpoint

    prepared = prepare_from_checkpoint(ckpt, dataset)
    pred = predict(model, prepared.test.x)
    naive = rmse(np.full_like(prepared.test.y, prepared.train.y.mean()), prepared.test.y)
    console.print(
        f"\n[bold]STGNN teacher[/bold]: {metrics['params']} parameters, best epoch "
        f"{metrics['best_epoch']} of {metrics['epochs_run']}, {metrics['train_seconds']:.0f} s"
    )
    console.print(
        f"  test RMSE {metrics['test_rmse']:.2f} cycles (PHM08 score {metrics['test_score']:.1f}) on "
        f"{metrics['test_units']} test units; predicting the mean RUL gives RMSE {naive:.2f}"
    )
    order = np.argsort(prepared.test.y)
    pick = order[np.linspace(0, len(order) - 1, min(5, len(order))).astype(int)]
    console.print(
        "  sample:  "
        + ", ".join(
            f"unit {prepared.test.unit[i]}: true {prepared.test.y[i]:.0f} / predicted {pred[i]:.0f}" for i in pick
        )
    )
    console.print(f"\ncheckpoint: {ckpt.path}   (try: edgeglm evaluate {ckpt.path})")
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    ok = bool(np.isfinite(metrics["test_rmse"])) and (quick or metrics["test_rmse"] < naive)
    if not ok:
        console.print(f"[red]check failed: test RMSE {metrics['test_rmse']:.2f} does not beat the naive {naive:.2f}")
    return 0 if ok else 1
