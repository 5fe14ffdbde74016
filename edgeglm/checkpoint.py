"""Checkpoint folders: what `edgeglm train` writes and every later stage reads.

::

    CHECKPOINT/
      weights.pt         model state_dict (torch)
      model.json         model config (kind + fields, see edgeglm.models.config)
      window_spec.json   WindowSpec: sensor order, window, normalization, RUL cap
      graph.json         SensorGraph the model was built on
      data.json          data source string, validation units, seed
      metrics.json       validation and test metrics, parameter count, training time

Everything but ``weights.pt`` is JSON, readable without torch; :func:`load_model`
is the only function here that imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeglm.errors import CheckpointError
from edgeglm.graph import SensorGraph
from edgeglm.models.config import ModelConfig, model_config_from_dict
from edgeglm.windowing import WindowSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CHECKPOINT_FILES", "Checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]

CHECKPOINT_FILES = ("weights.pt", "model.json", "window_spec.json", "graph.json", "data.json", "metrics.json")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's contents, minus the weights."""

    path: Path
    model_config: ModelConfig
    window_spec: WindowSpec
    graph: SensorGraph
    data: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """The data source string the model was trained on."""
        return str(self.data["source"])


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    out: Path,
    model: nn.Module,
    *,
    model_config: ModelConfig,
    window_spec: WindowSpec,
    graph: SensorGraph,
    data: dict[str, Any],
    metrics: dict[str, Any],
) -> Checkpoint:
    """Write a checkpoint folder (each file atomically) and return it."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".weights.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out / "weights.pt")
    _write_atomic(out / "model.json", json.dumps(model_config.to_dict(), indent=2))
    _write_atomic(out / "window_spec.json", json.dumps(window_spec.to_dict(), indent=2))
    _write_atomic(out / "graph.json", json.dumps(graph.to_dict(), indent=2))
    _write_atomic(out / "data.json", json.dumps(data, indent=2))
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    return Checkpoint(out, model_config, window_spec, graph, data, metrics)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint folder's JSON parts (no torch).

    Raises:
        CheckpointError: the folder or a file is missing, or a file does not parse.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist",
            hint="train one with `edgeglm train --out DIR` and pass DIR",
        )
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}",
            hint="the training run may have been interrupted; train again with `edgeglm train --out`",
        )
    try:
        parts = {f: json.loads((path / f).read_text()) for f in CHECKPOINT_FILES if f.endswith(".json")}
        return Checkpoint(
            path=path,
            model_config=model_config_from_dict(parts["model.json"]),
            window_spec=WindowSpec.from_dict(parts["window_spec.json"]),
            graph=SensorGraph.from_dict(parts["graph.json"]),
            data=parts["data.json"],
            metrics=parts["metrics.json"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable file: {exc}") from exc


def load_model(checkpoint: Checkpoint | Path | str) -> nn.Module:
    """Rebuild the model and load its weights (eval mode)."""
    import torch

    from edgeglm.models import build_model

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = build_model(ckpt.model_config, ckpt.graph.normalized())
    state = torch.load(ckpt.path / "weights.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {ckpt.path} do not match model.json: {exc}") from exc
    return model.eval()
