"""Accuracy of the STGNN teacher: C-MAPSS FD001 and the factory simulator with/without its graph.

Usage::

    python benchmarks/accuracy.py --data ../shared/datasets/cmapss --subset FD001 [--plot out.png]

Runs, in one process with the same seed and training settings:

1. the teacher on C-MAPSS (skipped with a message when no data folder is given or found),
2. the teacher on the factory simulator with the ground-truth sensor graph,
3. the same model on the simulator with no graph (identity adjacency: per-sensor features,
   mixed only by the head) — the baseline the graph must beat.

Prints a table, the graph-vs-no-graph RMSE ratio, and as its last line one JSON object:
``{"bench": "accuracy", "subset", "rmse", "score", "params", "seconds", "factory_rmse_graph",
"factory_rmse_nograph", "graph_gain"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _train(source: str, subset: str | None, graph: str | None, epochs: int, seed: int, progress: bool) -> dict:
    import torch

    from edgeglm.data.source import load_source, parse_source
    from edgeglm.models import build_model, count_parameters
    from edgeglm.training import TrainConfig, evaluate, fit, make_model_config, predict, prepare

    src = parse_source(source, subset=subset)
    dataset = load_source(src)
    prepared = prepare(dataset, seed=seed, conditions=src.conditions)
    torch.manual_seed(seed)
    cfg = make_model_config("stgnn", prepared, graph)
    model = build_model(cfg, prepared.graph.normalized())
    started = time.perf_counter()
    result = fit(
        model,
        prepared.train,
        prepared.val,
        TrainConfig(epochs=epochs, seed=seed),
        progress=progress,
        description=f"{dataset.name} graph={cfg.graph.value}",
    )
    seconds = time.perf_counter() - started
    test = evaluate(model, prepared.test)
    return {
        "data": dataset.name,
        "graph": cfg.graph.value,
        "rmse": test["rmse"],
        "score": test["score"],
        "params": count_parameters(model),
        "seconds": seconds,
        "best_epoch": result.best_epoch,
        "pred": predict(model, prepared.test.x),
        "true": prepared.test.y,
    }


def _plot(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        order = np.argsort(run["true"])
        ax.plot(run["true"][order], "k-", label="true RUL (capped)")
        ax.plot(run["pred"][order], "o", ms=3, alpha=0.7, label="predicted")
        ax.set_title(f"{run['data']} graph={run['graph']}: RMSE {run['rmse']:.2f}")
        ax.set_xlabel("test unit (sorted by true RUL)")
        ax.set_ylabel("RUL (cycles)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("EDGEGLM_CMAPSS"), help="C-MAPSS folder (or $EDGEGLM_CMAPSS)")
    ap.add_argument("--subset", default="FD001")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-factory", action="store_true", help="only the C-MAPSS run")
    ap.add_argument("--plot", type=Path, help="write predicted-vs-true plots (PNG)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    started = time.perf_counter()
    runs: list[dict] = []
    figures: dict = {"bench": "accuracy", "subset": args.subset}
    if args.data and (Path(args.data) / f"train_{args.subset}.txt").is_file():
        r = _train(f"cmapss:{args.data}", args.subset, None, args.epochs, args.seed, not args.quiet)
        runs.append(r)
        figures.update(
            rmse=round(r["rmse"], 3), score=round(r["score"], 1), params=r["params"], seconds=round(r["seconds"], 1)
        )
    else:
        print(f"C-MAPSS {args.subset} not found (pass --data or set EDGEGLM_CMAPSS): skipped", file=sys.stderr)
        figures.update(rmse=None, score=None, params=None, seconds=None)
    if not args.skip_factory:
        g = _train("factory", None, "fixed", args.epochs, args.seed, not args.quiet)
        n = _train("factory", None, "none", args.epochs, args.seed, not args.quiet)
        runs += [g, n]
        figures.update(
            factory_rmse_graph=round(g["rmse"], 3),
            factory_rmse_nograph=round(n["rmse"], 3),
            factory_score_graph=round(g["score"], 1),
            factory_score_nograph=round(n["score"], 1),
            graph_gain=round(n["rmse"] / g["rmse"], 3),
        )
    print(f"\n{'data':<10}{'graph':<8}{'RMSE':>8}{'score':>10}{'params':>9}{'seconds':>9}")
    for r in runs:
        print(f"{r['data']:<10}{r['graph']:<8}{r['rmse']:>8.2f}{r['score']:>10.1f}{r['params']:>9}{r['seconds']:>9.1f}")
    if "graph_gain" in figures:
        print(f"factory: no-graph RMSE / graph RMSE = {figures['graph_gain']:.2f}x")
    if args.plot and runs:
        _plot(args.plot, runs)
        print(f"plot: {args.plot}")
    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
