"""The offline compression pipeline (torch, onnx, onnxruntime).

One verb per technique, one frozen config each, chained by a TOML recipe::

    from edgeglm.compress import compress_checkpoint, load_recipe
    run = compress_checkpoint("runs/fd001", "runs/fd001-int8", recipe=load_recipe())

Passes: ``distill`` (teacher → student), ``prune`` (structured / unstructured),
``export`` (dynamo ONNX), ``fuse`` (portable graph fusions), ``quantize`` (INT8 QDQ,
accuracy-aware). ``fold_pyg`` turns PyTorch Geometric layers on a fixed graph into dense
ones; ``sparsify`` and ``ddp_hook`` hold Top-k gradient sparsification for training.

The functions ``fuse.fuse`` and ``quantize.quantize`` stay in their modules (not re-exported
here) so that ``edgeglm.compress.fuse`` and ``edgeglm.compress.quantize`` always name the modules.
"""

from __future__ import annotations

from edgeglm.compress.distill import DistillConfig, Student
from edgeglm.compress.export import ExportConfig, export_onnx
from edgeglm.compress.fold import SUPPORTED_LAYERS, fold_pyg
from edgeglm.compress.fuse import FuseConfig
from edgeglm.compress.passes import PassConfig, PassContext, PassResult, Stage, known_kinds, register_pass, run_pass
from edgeglm.compress.pipeline import CompressionRun, compress_checkpoint
from edgeglm.compress.prune import Importance, PruneConfig, PruneMode
from edgeglm.compress.quantize import CalibrationMethod, CalibrationReader, QuantizeConfig, WindowReader
from edgeglm.compress.recipe import DEFAULT_RECIPE, Recipe, load_recipe, parse_recipe
from edgeglm.compress.sparsify import Selection, SparsifyConfig, TopKCompressor

__all__ = [
    "DEFAULT_RECIPE",
    "SUPPORTED_LAYERS",
    "CalibrationMethod",
    "CalibrationReader",
    "CompressionRun",
    "DistillConfig",
    "ExportConfig",
    "FuseConfig",
    "Importance",
    "PassConfig",
    "PassContext",
    "PassResult",
    "PruneConfig",
    "PruneMode",
    "QuantizeConfig",
    "Recipe",
    "Selection",
    "SparsifyConfig",
    "Stage",
    "Student",
    "TopKCompressor",
    "WindowReader",
    "compress_checkpoint",
    "export_onnx",
    "fold_pyg",
    "known_kinds",
    "load_recipe",
    "parse_recipe",
    "register_pass",
    "run_pass",
]
