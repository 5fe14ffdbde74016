"""Teacher vs compressed artifact, side by side in one process.

Usage::

    python benchmarks/compress.py --data ../shared/datasets/cmapss --subset FD001 [--checkpoint DIR] [--out DIR]

Trains the FP32 STGNN teacher (or loads ``--checkpoint``), runs the default recipe
(prune → distill → fuse → INT8 quantize), then measures the teacher's ONNX export and the
final artifact in this process with the same code: test RMSE and PHM08 score, file size,
ONNX Runtime CPU latency with 1 thread at batch 1 and batch 64 (median of ``--runs`` runs
after warm-up). Prints the ratios and, as its last line, one JSON object with
``rmse_fp32, rmse_int8, delta_rmse, size_fp32, size_int8, size_ratio, speedup_b1, speedup_b64, seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default=os.environ.get("EDGEGLM_CMAPSS"), help="C-MAPSS folder (default: $EDGEGLM_CMAPSS)"
    )
    ap.add_argument("--subset", default="FD001")
    ap.add_argument("--checkpoint", type=Path, help="use this trained checkpoint instead of training one")
    ap.add_argument("--recipe", type=Path, help="recipe TOML (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-compress"))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--runs", type=int, default=300, help="timed runs per latency figure (≥ 200)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    from edgeglm.checkpoint import load_checkpoint, load_model
    from edgeglm.compress.measure import OnnxModel, file_sizes
    from edgeglm.compress.passes import Stage
    from edgeglm.compress.pipeline import compress_checkpoint, measure_stage
    from edgeglm.data.source import load_source
    from edgeglm.training import TrainConfig, prepare_from_checkpoint, train_from_source

    started = time.perf_counter()
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        train_s = 0.0
    else:
        if args.data and (Path(args.data) / f"train_{args.subset}.txt").is_file():
            source = f"cmapss:{args.data}"
        else:
            print(
                f"C-MAPSS {args.subset} not found (--data / EDGEGLM_CMAPSS): using the factory simulator",
                file=sys.stderr,
            )
            source = "factory"
        t0 = time.perf_counter()
        _, ckpt, _ = train_from_source(
            source,
            args.out / "teacher",
            subset=args.subset,
            train_config=TrainConfig(epochs=args.epochs),
            progress=not args.quiet,
        )
        train_s = time.perf_counter() - t0
        assert ckpt is not None
    t0 = time.perf_counter()
    run = compress_checkpoint(
        ckpt, args.out / "compressed", recipe=args.recipe, progress=not args.quiet, latency_runs=50
    )
    recipe_s = time.perf_counter() - t0

    # Side by side, same process, same code: the teacher's FP32 export vs the final artifact.
    dataset = load_source(ckpt.source)
    prepared = prepare_from_checkpoint(ckpt, dataset)
    teacher_onnx, _ = measure_stage(Stage("teacher", torch_model=load_model(ckpt)), prepared, args.out, latency_runs=5)
    rows = {}
    for name, path in (("fp32", teacher_onnx), ("int8", run.model_path)):
        m = OnnxModel(path, threads=1)
        acc = m.accuracy(prepared.test.x, prepared.test.y)
        sample = prepared.val.x[:64]
        rows[name] = {
            "rmse": acc["rmse"],
            "score": acc["score"],
            **file_sizes(path),
            "b1_ms": m.latency(sample, batch=1, runs=args.runs).median_ms,
            "b64_ms": m.latency(sample, batch=64, runs=args.runs).median_ms,
        }
    a, b = rows["fp32"], rows["int8"]
    print(f"\n{'':6}{'RMSE':>8}{'score':>9}{'size KiB':>10}{'zstd KiB':>10}{'b1 µs':>9}{'b64 ms':>9}")
    for name, r in rows.items():
        print(
            f"{name:6}{r['rmse']:>8.2f}{r['score']:>9.1f}{r['size_bytes'] / 1024:>10.1f}{r['zstd_bytes'] / 1024:>10.1f}"
            f"{r['b1_ms'] * 1000:>9.0f}{r['b64_ms']:>9.2f}"
        )
    figures = {
        "bench": "compress",
        "data": dataset.name,
        "rmse_fp32": round(a["rmse"], 3),
        "rmse_int8": round(b["rmse"], 3),
        "delta_rmse": round(b["rmse"] - a["rmse"], 3),
        "score_fp32": round(a["score"], 1),
        "score_int8": round(b["score"], 1),
        "size_fp32": a["size_bytes"],
        "size_int8": b["size_bytes"],
        "size_ratio": round(a["size_bytes"] / b["size_bytes"], 2),
        "zstd_ratio": round(a["zstd_bytes"] / b["zstd_bytes"], 2),
        "speedup_b1": round(a["b1_ms"] / b["b1_ms"], 2),
        "speedup_b64": round(a["b64_ms"] / b["b64_ms"], 2),
        "recipe_seconds": round(recipe_s, 1),
        "train_seconds": round(train_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"size x{figures['size_ratio']}, speed x{figures['speedup_b1']} (b1) x{figures['speedup_b64']} (b64), "
        f"delta RMSE {figures['delta_rmse']:+.3f}; report: {run.out / 'report.md'}"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
