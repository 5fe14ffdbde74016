"""Pruning: structured (channels physically removed across dependent layers) and unstructured.

**Structured** pruning removes whole output channels (hidden units) and, with them, every
weight that reads or writes them. Which weights belong together is found by Torch-Pruning's
dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023,
https://arxiv.org/abs/2301.12900), traced on an example window. For the STGNN a *group*
is, e.g., the residual stream: channel ``c`` of the input conv, of every block's
residual add, BatchNorm, graph-conv output ``Θ``, temporal-conv input, read-out input
and the ``N`` columns ``c·N … c·N + N − 1`` of the head's first Linear (after Flatten).
The dense graph product ``X Âᵀ`` mixes nodes, not channels, so the dependency graph passes
through it unchanged. The gated temporal conv computes ``2C`` channels and splits them
into ``f, g`` with ``h = tanh(f) ⊙ σ(g)``: channel ``i`` of ``h`` needs rows ``i`` and
``C + i``, so the conv is declared as two output-channel groups and the pair is removed
together (checked on every step: the halves stay equal).

Importance of a group ``G`` of channel slices ``w_k`` (summed over the group's layers)::

    MAGNITUDE   I(G) = Σ_k ‖w_k‖₂²
    TAYLOR      I(G) = Σ_k |w_k · ∂L/∂w_k|      (first-order loss change, Molchanov et al.
                                                  CVPR 2019, https://arxiv.org/abs/1906.10771)

Every group loses the same fraction ``r`` of its channels (or, with ``global_pruning``, the
least important channels model-wide go first, at most ``max_channel_ratio`` of any layer).
The parameter count is a step function of ``r``, so ``r`` is found by bisection for the
asked target: after step ``k`` of ``S`` the model holds
``P_k = P_0 − (P_0 − P_target) · k / S`` parameters (nearest reachable count), and is
fine-tuned for ``finetune_epochs`` on the training windows before the next step.
Never pruned: the model's last layer (its single RUL output), the model input (the
1-channel input conv reads the raw window), parameters outside Conv/Linear/BatchNorm
(the adaptive adjacency's node embeddings).

**Unstructured** pruning zeroes the individual weights of smallest magnitude over all
Conv and Linear weights at once (global magnitude, ``torch.nn.utils.prune``), then makes
the zeros permanent (``prune.remove``). The tensors keep their shapes, so the model is
not faster; its value is a smaller *compressed* artifact for over-the-air updates. The
record gives the zstd-compressed size of the exported ONNX file before and after.
Exactly ``round(ratio · n)`` of the ``n`` prunable weights end up zero.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch_pruning as tp
import zstandard
from torch import nn
from torch.nn.utils import prune as torch_prune

from edgeglm.compress.export import export_onnx
from edgeglm.compress.passes import PassConfig, PassContext, PassResult, Stage, register_pass
from edgeglm.errors import ConfigError
from edgeglm.models import STGNN, DenseGraphConv, TemporalConv, count_parameters
from edgeglm.training import TrainConfig, evaluate, fit

__all__ = ["Importance", "PruneConfig", "PruneMode", "compressed_size"]

#: zstd level used to measure the over-the-air size of an artifact.
ZSTD_LEVEL = 19
# Windows used to compute the gradients of Taylor importance.
_TAYLOR_WINDOWS = 512
# Coarse grid of channel ratios scanned first, then bisection rounds inside the bracket
# (2^-12 of a grid step is far below one channel of any layer).
_GRID_POINTS = 8
_BISECTION_ROUNDS = 12
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
# ONNX Runtime vs torch tolerance relative to the output scale: outputs are RUL in cycles
# (up to ``rul_cap``), where one float32 ULP is already ~8e-6 at 100 cycles.
_EXPORT_RTOL = 1e-6


class PruneMode(str, Enum):
    """What pruning removes."""

    STRUCTURED = "structured"  # whole channels / hidden units: a smaller, faster dense model
    UNSTRUCTURED = "unstructured"  # single weights set to zero: a smaller compressed file


class Importance(str, Enum):
    """How a channel's importance is scored (structured pruning)."""

    MAGNITUDE = "magnitude"
    TAYLOR = "taylor"


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    """The ``[prune]`` table of a recipe.

    Args:
        mode: structured (channels) or unstructured (single weights) (default: structured).
        importance: channel score, magnitude or Taylor (default: magnitude). Unstructured
            pruning always ranks by magnitude.
        ratio: fraction of the parameters to remove, in (0, 1). Structured: of all trainable
            parameters; unstructured: of the Conv/Linear weights (default: 0.5 when
            ``target_params`` is not given either).
        target_params: parameters to keep instead of a ratio. Structured: trainable
            parameters after pruning; unstructured: non-zero trainable parameters.
        steps: pruning steps, each followed by fine-tuning (default: 1).
        finetune_epochs: epochs of fine-tuning after each step; 0 disables it (default: 3).
        finetune_lr: peak learning rate of fine-tuning (default: 1e-3).
        finetune_batch_size: windows per fine-tuning step (default: 256).
        global_pruning: rank channels model-wide instead of removing the same fraction of
            every layer (default: False).
        max_channel_ratio: never remove more than this fraction of a layer's channels,
            in (0, 1) (default: 0.9).
        schema_version: version of this table's schema (default: 1).
    """

    kind: ClassVar[str] = "prune"
    mode: PruneMode = PruneMode.STRUCTURED
    importance: Importance = Importance.MAGNITUDE
    ratio: float | None = None
    target_params: int | None = None
    steps: int = 1
    finetune_epochs: int = 3
    finetune_lr: float = 1e-3
    finetune_batch_size: int = 256
    global_pruning: bool = False
    max_channel_ratio: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mode", _enum(PruneMode, self.mode, "mode"))
        object.__setattr__(self, "importance", _enum(Importance, self.importance, "importance"))
        if self.ratio is not None and self.target_params is not None:
            raise ConfigError(
                f"[prune] ratio={self.ratio} and target_params={self.target_params} both given",
                hint="give one of them: ratio (fraction removed) or target_params (parameters kept)",
            )
        if self.ratio is None and self.target_params is None:
            object.__setattr__(self, "ratio", 0.5)
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"[prune] ratio must be in (0, 1), got {self.ratio}", hint="e.g. ratio = 0.5")
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError(f"[prune] target_params must be ≥ 1, got {self.target_params}")
        if self.steps < 1:
            raise ConfigError(f"[prune] steps must be ≥ 1, got {self.steps}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"[prune] finetune_epochs must be ≥ 0, got {self.finetune_epochs}")
        if self.finetune_batch_size < 1:
            raise ConfigError(f"[prune] finetune_batch_size must be ≥ 1, got {self.finetune_batch_size}")
        if not self.finetune_lr > 0:
            raise ConfigError(f"[prune] finetune_lr must be > 0, got {self.finetune_lr}")
        if not 0.0 < self.max_channel_ratio < 1.0:
            raise ConfigError(f"[prune] max_channel_ratio must be in (0, 1), got {self.max_channel_ratio}")
        if self.mode is PruneMode.UNSTRUCTURED and self.importance is not Importance.MAGNITUDE:
            raise ConfigError(
                f"[prune] importance={self.importance.value!r} with mode='unstructured'",
                hint="unstructured pruning ranks single weights by magnitude: use importance = 'magnitude'",
            )


def _enum(cls: type[Enum], value: Any, name: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"[prune] {name}={value!r} is not valid; valid: {valid}") from None


def compressed_size(path: Path, *, level: int = ZSTD_LEVEL) -> int:
    """Bytes of ``path`` after zstd compression at ``level`` (what an OTA transfer carries)."""
    return len(zstandard.ZstdCompressor(level=level).compress(Path(path).read_bytes()))


# -- the pass ---------------------------------------------------------------------------------


@register_pass(PruneConfig)
def _run_prune(stage: Stage, config: PruneConfig, ctx: PassContext) -> PassResult:
    if stage.is_onnx or stage.torch_model is None:
        raise ConfigError(
            f"prune got the ONNX stage {stage.name!r} ({stage.onnx_path})",
            hint="prune works on the torch model: list prune (and distill) before export in the recipe",
        )
    prepared = ctx.prepared
    original = stage.torch_model.eval()
    model = copy.deepcopy(original)
    example = torch.from_numpy(prepared.val.x[:2].copy())
    params_before = count_parameters(model)
    val_before = evaluate(model, prepared.val)["rmse"]
    channels_before = _channels(model)

    def finetune(m: nn.Module, step: int) -> None:
        if config.finetune_epochs == 0:
            return
        cfg = TrainConfig(
            epochs=config.finetune_epochs,
            lr=config.finetune_lr,
            batch_size=config.finetune_batch_size,
            patience=config.finetune_epochs,
            seed=ctx.seed + step,
            threads=ctx.threads,
        )
        description = f"fine-tune prune step {step}/{config.steps}"
        fit(
            m,
            prepared.train,
            prepared.val,
            cfg,
            rul_cap=prepared.spec.rul_cap,
            progress=ctx.progress,
            description=description,
        )

    record: dict[str, Any] = {"mode": config.mode.value, "params_before": params_before}
    if config.mode is PruneMode.STRUCTURED:
        model, steps = _prune_structured(model, config, example, prepared, finetune, ctx.seed)
        record["importance"] = config.importance.value
    else:
        model, steps, sparsity = _prune_unstructured(model, config, prepared, finetune)
        record.update(sparsity)
    model.eval()
    outdir = Path(ctx.workdir) / f"prune_{config.mode.value}"
    window, nodes = prepared.spec.window, prepared.spec.num_sensors
    atol = _EXPORT_RTOL * prepared.spec.rul_cap
    before = export_onnx(original, outdir / "before.onnx", window=window, num_nodes=nodes, atol=atol)
    after = export_onnx(model, outdir / "after.onnx", window=window, num_nodes=nodes, atol=atol)
    params_after = count_parameters(model)
    channels_after = _channels(model)
    record.update(
        {
            "ratio_asked": config.ratio,
            "target_params": config.target_params,
            "params_after": params_after,
            "params_removed_ratio": 1.0 - params_after / params_before,
            "channels": {name: [c, channels_after.get(name, 0)] for name, c in channels_before.items()},
            "steps": steps,
            "val_rmse_before": val_before,
            "val_rmse_after": evaluate(model, prepared.val)["rmse"],
            "onnx_after": str(after.path),
            "onnx_bytes_before": before.path.stat().st_size,
            "onnx_bytes_after": after.path.stat().st_size,
            "zstd_bytes_before": compressed_size(before.path),
            "zstd_bytes_after": compressed_size(after.path),
            "zstd_level": ZSTD_LEVEL,
        }
    )
    name = "pruned" if config.mode is PruneMode.STRUCTURED else "sparse"
    return PassResult(Stage(name=name, torch_model=model, architecture=stage.architecture), record)


# -- structured -------------------------------------------------------------------------------


def _prune_structured(
    model: nn.Module, config: PruneConfig, example: torch.Tensor, prepared: Any, finetune: Any, seed: int
) -> tuple[nn.Module, list[dict[str, Any]]]:
    p0 = count_parameters(model)
    target = round(p0 * (1 - config.ratio)) if config.ratio is not None else int(config.target_params)  # type: ignore[arg-type]
    if target >= p0:
        raise ConfigError(
            f"[prune] target_params={target} is not below the model's {p0} parameters",
            hint=f"ask for fewer than {p0} parameters",
        )
    grads_batch = _taylor_batch(prepared, seed) if config.importance is Importance.TAYLOR else None
    steps = []
    for step in range(1, config.steps + 1):
        want = round(p0 - (p0 - target) * step / config.steps)
        model = _prune_to(model, want, config, example, grads_batch)
        got = count_parameters(model)
        pruned_rmse = evaluate(model, prepared.val)["rmse"]
        finetune(model, step)
        steps.append(
            {
                "step": step,
                "params_target": want,
                "params": got,
                "val_rmse_pruned": pruned_rmse,
                "val_rmse_finetuned": evaluate(model, prepared.val)["rmse"],
            }
        )
    return model, steps


def _prune_to(model: nn.Module, target: int, config: PruneConfig, example: torch.Tensor, grads_batch: Any) -> nn.Module:
    """A pruned copy of ``model`` whose parameter count is nearest to ``target``.

    The count falls with the ratio ``r`` until groups start to be skipped (a group that
    would lose all its channels, or with global ranking falls below the threshold as a
    whole, is left alone), so ``r`` is first scanned on a coarse grid up to the smallest
    count, then bisected inside the bracket holding ``target``.
    """
    if grads_batch is not None:
        _taylor_gradients(model, *grads_batch)
    top = _max_ratio(model, config, example)
    grid = [(0.0, count_parameters(model), model)]
    for k in range(1, _GRID_POINTS + 1):
        r = top * k / _GRID_POINTS
        candidate = _pruned_copy(model, r, config, example)
        got = count_parameters(candidate)
        if got >= grid[-1][1]:  # skipped groups: fewer channels no longer means fewer parameters
            break
        grid.append((r, got, candidate))
    reachable = grid[-1][1]
    if reachable > target:
        raise ConfigError(
            f"[prune] cannot reach {target} parameters (from {count_parameters(model)}): "
            f"at most {grid[-1][0]:.0%} of the channels can go, which leaves {reachable}",
            hint=f"ask for at least {reachable} parameters (a smaller ratio) or raise max_channel_ratio",
        )
    k = next(i for i, (_, got, _) in enumerate(grid) if got <= target)
    (lo, lo_count, lo_model), (hi, hi_count, hi_model) = grid[k - 1], grid[k]
    best = min([(lo_count, lo_model), (hi_count, hi_model)], key=lambda c: abs(c[0] - target))
    for _ in range(_BISECTION_ROUNDS):
        if best[0] == target:
            break
        mid = (lo + hi) / 2
        candidate = _pruned_copy(model, mid, config, example)
        got = count_parameters(candidate)
        if abs(got - target) < abs(best[0] - target):
            best = (got, candidate)
        if got > target:
            lo = mid
        else:
            hi = mid
    if best[1] is model:  # nothing to remove: the asked target is the model itself
        best = (best[0], copy.deepcopy(model))
    model.zero_grad(set_to_none=True)
    best[1].zero_grad(set_to_none=True)
    return best[1]


def _max_ratio(model: nn.Module, config: PruneConfig, example: torch.Tensor) -> float:
    """The largest ratio that leaves every group at least one channel.

    Torch-Pruning keeps ``⌊C (1 − r)⌋`` of a group's ``C`` channels and skips a group that would
    lose all of them, so above ``1 − 1/C_min`` the parameter count stops falling with ``r``.
    """
    m = copy.deepcopy(model)
    pruner, gated = _pruner(m, 0.0, config, example)
    widths = [
        pruner.DG.get_out_channels(root) // gated.get(root, 1)
        for group in pruner.DG.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        )
        for root in [group[0].dep.target.module]
    ]
    smallest = min((w for w in widths if w >= 2), default=1)
    if smallest < 2:
        raise ConfigError(f"[prune] {type(model).__name__} has no layer with two or more prunable channels")
    return min(config.max_channel_ratio, 1.0 - 1.0 / smallest - 1e-6)


def _pruner(m: nn.Module, ratio: float, config: PruneConfig, example: torch.Tensor) -> tuple[Any, dict[nn.Module, int]]:
    """Torch-Pruning's pruner for ``m``; gated convs are declared as two output-channel groups."""
    gated = {t.conv: 2 for t in m.modules() if isinstance(t, TemporalConv)}
    importance: Any = (
        tp.importance.GroupTaylorImportance()
        if config.importance is Importance.TAYLOR
        else tp.importance.GroupMagnitudeImportance(p=2)
    )
    with warnings.catch_warnings(), _constant_supports(m):
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            m,
            example,
            importance=importance,
            pruning_ratio=ratio,
            global_pruning=config.global_pruning,
            max_pruning_ratio=config.max_channel_ratio,
            ignored_layers=[_output_layer(m, example), *_loose_parameters(m), *_time_factorization(m)],
            out_channel_groups=dict(gated),
        )
    return pruner, gated


@contextlib.contextmanager
def _constant_supports(model: nn.Module) -> Iterator[None]:
    """Trace the STGNN with its adjacencies as constants.

    The adaptive adjacency is computed from node embeddings; traced as a tensor with a
    gradient, Torch-Pruning would take ``X Âᵀ`` for a product of two feature maps and tie
    channels to nodes. Detached, it is a constant like the fixed ``Â``: the graph product
    mixes nodes and passes channels through.
    """
    if not isinstance(model, STGNN):
        yield
        return
    model.supports = lambda: [a.detach() for a in STGNN.supports(model)]  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.supports


def _pruned_copy(model: nn.Module, ratio: float, config: PruneConfig, example: torch.Tensor) -> nn.Module:
    m = copy.deepcopy(model)
    for p, q in zip(model.parameters(), m.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    pruner, gated = _pruner(m, ratio, config, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in pruner.step(interactive=True):
            _check_gates(group, gated)
            group.prune()
    _sync_widths(m)
    return m.eval()


def _time_factorization(model: nn.Module) -> list[nn.Module]:
    """The MLP student's shared temporal map (``temporal > 0``) stays whole.

    Its outputs reach the first hidden layer through a transpose and a flatten (sensor-major),
    an index mapping Torch-Pruning's dependency graph gets wrong (seen on FD001: it removed one
    of the 8 temporal features — 14 flattened inputs — but only one input column of the next
    layer, so the pruned model no longer ran). The hidden layers
    after it are pruned as usual; the map itself is 30·k weights, too few to matter.
    """
    time = getattr(model, "time", None)
    return [time] if isinstance(time, nn.Linear) else []


def _output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last Conv/Linear the forward pass runs: its outputs are the model's outputs."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ConfigError(f"[prune] {type(model).__name__} has no Conv or Linear layer to prune")
    return order[-1]


def _loose_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters held outside Conv/Linear/BatchNorm (e.g. adaptive-adjacency embeddings)."""
    owned = (*_PRUNABLE, nn.BatchNorm1d, nn.BatchNorm2d)
    return [p for m in model.modules() if not isinstance(m, owned) for p in m.parameters(recurse=False)]


def _check_gates(group: Any, gated: dict[nn.Module, int]) -> None:
    """Both halves ``f, g`` of a gated conv lose the same channels: ``i`` and ``C + i`` together."""
    for item in group:
        conv = item.dep.target.module
        if conv in gated and item.dep.handler == tp.prune_conv_out_channels:
            half = conv.out_channels // 2
            idxs = {int(i) for i in item.idxs}
            if {i for i in idxs if i < half} != {i - half for i in idxs if i >= half}:
                raise RuntimeError(
                    f"torch-pruning would remove unpaired gate channels {sorted(idxs)} of {conv}; "
                    "the tanh/sigmoid halves must stay equal"
                )


def _sync_widths(model: nn.Module) -> None:
    """Update the width attributes the pruned modules read in ``forward`` / ``extra_repr``."""
    for m in model.modules():
        if isinstance(m, TemporalConv):
            if m.conv.out_channels % 2:
                raise RuntimeError(f"gated conv left with an odd channel count {m.conv.out_channels}")
            m.out_channels = m.conv.out_channels // 2
        elif isinstance(m, DenseGraphConv):
            m.in_channels, m.out_channels = m.theta.in_channels, m.theta.out_channels


def _channels(model: nn.Module) -> dict[str, int]:
    """Output channels (Conv) or units (Linear) per layer."""
    return {
        name: int(m.out_channels if isinstance(m, (nn.Conv1d, nn.Conv2d)) else m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE)
    }


def _taylor_batch(prepared: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    train = prepared.train
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), min(_TAYLOR_WINDOWS, len(train)), replace=False))
    return torch.from_numpy(train.x[idx]), torch.from_numpy(train.y[idx]), float(prepared.spec.rul_cap)


def _taylor_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rul_cap: float) -> None:
    """``∂L/∂w`` of the training loss (MSE on ``y / rul_cap``) in eval mode, into ``.grad``."""
    model.eval().zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x).reshape(-1) / rul_cap, y / rul_cap)
    loss.backward()


# -- unstructured -----------------------------------------------------------------------------


def _prune_unstructured(
    model: nn.Module, config: PruneConfig, prepared: Any, finetune: Any
) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    targets = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]
    total = sum(m.weight.numel() for m, _ in targets)
    if config.ratio is not None:
        zeros = round(config.ratio * total)
    else:
        p0 = count_parameters(model)
        zeros = p0 - int(config.target_params)  # type: ignore[arg-type]
        if not 0 < zeros <= total:
            raise ConfigError(
                f"[prune] target_params={config.target_params} needs {zeros} zero weights; "
                f"the model has {total} prunable Conv/Linear weights of {p0} parameters",
                hint=f"ask for target_params between {p0 - total} and {p0 - 1}",
            )
    steps = []
    for step in range(1, config.steps + 1):
        want = round(zeros * step / config.steps)
        already = sum(int((getattr(m, "weight_mask", torch.ones(1)) == 0).sum()) for m, _ in targets)
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=want - already)
        pruned_rmse = evaluate(model, prepared.val)["rmse"]
        finetune(model, step)
        steps.append(
            {
                "step": step,
                "zeros_target": want,
                "val_rmse_pruned": pruned_rmse,
                "val_rmse_finetuned": evaluate(model, prepared.val)["rmse"],
            }
        )
    for m, name in targets:
        torch_prune.remove(m, name)
    got = sum(int((m.weight == 0).sum()) for m, _ in targets)
    layers = {
        name: [int(m.weight.numel()), int((m.weight == 0).sum())]
        for name, m in model.named_modules()
        if isinstance(m, _PRUNABLE)
    }
    sparsity = {
        "prunable_weights": total,
        "zero_weights": got,
        "sparsity": got / total,
        "nonzero_params_after": count_parameters(model) - got,
        "zeros_per_layer": layers,
    }
    return model, steps, sparsity
