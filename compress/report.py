"""The compression report: report.json (figures), report.md (tables), report.png (one plot)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeglm.compress.pipeline import CompressionRun

__all__ = ["write_report"]


def _float_nodes(run: CompressionRun) -> list[dict]:
    for s in run.stages:
        if s.pass_kind == "quantize":
            return list(s.record.get("kept_float", []))
    return []


def write_report(run: CompressionRun, *, data_name: str) -> None:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``run.out``."""
    out = run.out
    summary = run.summary()
    doc = {
        "data": data_name,
        "checkpoint": str(run.checkpoint),
        "recipe": run.recipe.to_dict(),
        **summary,
        "kept_float": _float_nodes(run),
        "stages": [asdict(s) for s in run.stages],
    }
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str))

    lines = [
        f"# Compression report — {data_name}",
        "",
        f"Checkpoint `{run.checkpoint}`, recipe `{run.recipe.name}` "
        f"({' → '.join(p.kind for p in run.recipe.passes)}), {run.seconds:.0f} s.",
        "",
        "| stage | pass | model | params | val RMSE | test RMSE | PHM08 score | size KiB | zstd KiB | b1 µs | b64 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in run.stages:
        lines.append(
            f"| {s.name} | {s.pass_kind} | {s.architecture} | {s.params if s.params is not None else '–'} "
            f"| {s.val_rmse:.2f} | {s.test_rmse:.2f} | {s.test_score:.1f} | {s.size_bytes / 1024:.1f} "
            f"| {s.zstd_bytes / 1024:.1f} | {s.latency_b1_ms * 1000:.0f} | {s.latency_b64_ms:.2f} |"
        )
    lines += [
        "",
        f"First → last: test RMSE {summary['rmse_fp32']:.2f} → {summary['rmse_int8']:.2f} "
        f"(Δ {summary['delta_rmse']:+.2f}), size ×{summary['size_ratio']:.1f} smaller, "
        f"latency ×{summary['speedup_b1']:.1f} (batch 1) and ×{summary['speedup_b64']:.1f} (batch 64) faster.",
        "",
        "Latency: ONNX Runtime CPU, 1 thread, median of timed runs after warm-up. Accuracy: validation units "
        "of the checkpoint and the last window of every test unit.",
    ]
    kept = _float_nodes(run)
    if kept:
        lines += ["", "## Nodes kept in float", "", "| node | why |", "|---|---|"]
        lines += [f"| `{k.get('node')}` | {k.get('reason', '')} |" for k in kept]
    for s in run.stages:
        extra = {k: v for k, v in s.record.items() if k != "config" and not isinstance(v, (dict, list))}
        if extra:
            lines += ["", f"## {s.name} ({s.pass_kind})", ""]
            lines += [f"- {k}: {v}" for k, v in extra.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(run, out / "report.png", data_name)


def _plot(run: CompressionRun, path, data_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    sizes = [s.size_bytes / 1024 for s in run.stages]
    rmses = [s.test_rmse for s in run.stages]
    lat = [s.latency_b1_ms * 1000 for s in run.stages]
    area = [max(30.0, 600.0 * v / max(lat)) for v in lat]
    ax.plot(sizes, rmses, "-", color="0.75", zorder=1)
    sc = ax.scatter(sizes, rmses, s=area, c=lat, cmap="viridis_r", zorder=2, edgecolors="k")
    for s, x, y, t in zip(run.stages, sizes, rmses, lat, strict=True):
        ax.annotate(f"{s.name}\n{t:.0f} µs", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model file size (KiB, log scale)")
    ax.set_ylabel("test RMSE (cycles)")
    ax.set_title(f"{data_name}: accuracy vs size vs latency per stage")
    cb = fig.colorbar(sc, ax=ax)
    cb.set_label("latency, batch 1, 1 thread (µs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
