"""Knowledge distillation for RUL regression: a fresh, small student learns from the teacher.

Students: a smaller STGNN (``"stgnn-small"``) or a graph-free MLP over the flattened
window (``"mlp"``, GLNN-style: Zhang et al., ICLR 2022, https://arxiv.org/abs/2110.08727).
The teacher ``T`` is the pass context's FP32 model (``PassContext.teacher``), frozen and in
eval mode; the student ``S`` starts from fresh weights and becomes the new stage. The
incoming stage is only checked to be a torch model: in ``prune → distill`` the student
learns from the original teacher and the pruned model is discarded.

Loss of optimizer step ``t`` of ``T_steps = epochs · ⌈n_train / batch_size⌉``, on targets
scaled by the RUL cap ``c`` (the training loss of :func:`edgeglm.training.fit`)::

    α_t   = α_end + (α_start − α_end) · ½ (1 + cos(π t / T_steps))          cosine anneal
    task  = mean (S(x)/c − y/c)²                                             ground truth
    soft  = mean (S(x)/c − T(x)/c)²                                          teacher's prediction
    hint  = mean (P(f_S(x)) − f_T(x))²                                       features (optional)
    L_t   = (1 − α_t) · task + α_t · (soft + β · hint)

so training starts on the teacher (``α_start``, default 0.9) and ends on the task
(``α_end``, default 0.1). For regression the teacher's prediction *is* the soft target:
there are no logits to soften with a temperature, and since ``(1 − α)(s − y)² + α(s − t)²
= (s − ((1 − α) y + α t))² + const``, the schedule anneals the regression target from the
teacher's smooth prediction to the noisy label. The teacher's predictions are computed
once per training window and reused every epoch. The hint term (FitNets, Romero et al., ICLR 2015,
https://arxiv.org/abs/1412.6550) matches the student's last hidden features ``f_S``
(``features(x)``) through a learned projection ``P`` to the teacher's ``f_T``: a 1×1
convolution per node when both are STGNNs (``(B, C_S, 1, N) → (B, C_T, 1, N)``), else a
Linear layer on the flattened features. ``P`` is trained with the student and dropped
afterwards; the hint fades with ``α_t`` like the soft term.

The pass also trains the same student (same config, seed, epochs and data) without the
teacher, plain MSE on the task: the record puts the distilled student next to that
scratch baseline (validation and test RMSE, and RMSE against the teacher's predictions).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from edgeglm.compress.passes import PassConfig, PassContext, PassResult, Stage, register_pass
from edgeglm.errors import ConfigError
from edgeglm.metrics import rmse
from edgeglm.models import (
    STGNN,
    GraphMode,
    MLPConfig,
    MLPStudent,
    ModelConfig,
    STGNNConfig,
    build_model,
    count_parameters,
)
from edgeglm.training import MODEL_PRESETS, TrainConfig, evaluate, fit, predict

__all__ = ["DistillConfig", "Student", "alpha_at"]


class Student(str, Enum):
    """The student architecture (its default widths are :data:`edgeglm.training.MODEL_PRESETS`)."""

    STGNN_SMALL = "stgnn-small"
    MLP = "mlp"


@dataclass(frozen=True)
class DistillConfig(PassConfig):
    """The ``[distill]`` table of a recipe.

    Args:
        student: the student architecture (default: ``"mlp"``).
        hidden: MLP student only: hidden widths instead of the preset's (default: preset).
        temporal: MLP student only: learned temporal features per sensor before the first
            hidden layer (0 = flatten the window; see :class:`edgeglm.models.MLPConfig`).
        channels: STGNN student only: hidden channels (default: preset).
        blocks: STGNN student only: spatio-temporal blocks (default: preset).
        head_hidden: STGNN student only: hidden units of the head (default: preset).
        epochs: training epochs of the student, and of the scratch baseline (default: 30).
        batch_size: windows per step (default: 256).
        lr: peak learning rate (default: 2e-3).
        patience: early-stopping patience in epochs (default: 10).
        alpha_start: weight of the teacher terms at step 0, in [0, 1] (default: 0.9).
        alpha_end: weight of the teacher terms at the last step, in [0, alpha_start] (default: 0.1).
        hint_weight: ``β``, weight of the feature (hint) loss; 0 disables it (default: 0).
        schema_version: version of this table's schema (default: 1).
    """

    kind: ClassVar[str] = "distill"
    student: Student = Student.MLP
    hidden: tuple[int, ...] | None = None
    temporal: int | None = None
    channels: int | None = None
    blocks: int | None = None
    head_hidden: int | None = None
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    patience: int = 10
    alpha_start: float = 0.9
    alpha_end: float = 0.1
    hint_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "student", Student(self.student))
        except ValueError:
            valid = ", ".join(repr(s.value) for s in Student)
            raise ConfigError(f"[distill] student={self.student!r} is not a student; valid: {valid}") from None
        stgnn_fields = [f for f in ("channels", "blocks", "head_hidden") if getattr(self, f) is not None]
        if self.student is Student.MLP and stgnn_fields:
            raise ConfigError(
                f"[distill] {stgnn_fields} set for the mlp student",
                hint="channels/blocks/head_hidden size an STGNN student; size the mlp with hidden = [...]",
            )
        if self.student is Student.STGNN_SMALL and self.temporal is not None:
            raise ConfigError(
                "[distill] temporal set for the stgnn-small student",
                hint="temporal factorizes the mlp student's input; the STGNN has temporal convolutions",
            )
        if self.student is Student.STGNN_SMALL and self.hidden is not None:
            raise ConfigError(
                "[distill] hidden set for the stgnn-small student",
                hint="hidden sizes the mlp student; size the STGNN with channels, blocks, head_hidden",
            )
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
            if not self.hidden or min(self.hidden) < 1:
                raise ConfigError(f"[distill] hidden must be a non-empty list of widths ≥ 1, got {list(self.hidden)}")
        for name in ("channels", "blocks", "head_hidden"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"[distill] {name} must be ≥ 1, got {v}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[distill] {name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"[distill] lr must be > 0, got {self.lr}")
        if not 0.0 <= self.alpha_end <= self.alpha_start <= 1.0:
            raise ConfigError(
                f"[distill] need 0 ≤ alpha_end ≤ alpha_start ≤ 1, got alpha_start={self.alpha_start}, "
                f"alpha_end={self.alpha_end}",
                hint="start soft (alpha_start near 1) and end on the task (alpha_end near 0)",
            )
        if self.hint_weight < 0:
            raise ConfigError(f"[distill] hint_weight must be ≥ 0, got {self.hint_weight}")


def alpha_at(step: int, total_steps: int, alpha_start: float, alpha_end: float) -> float:
    """``α_t = α_end + (α_start − α_end) · ½ (1 + cos(π t / T))``, held at ``α_end`` after ``T``."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return alpha_end + (alpha_start - alpha_end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class _Distilled(nn.Module):
    """The student plus the hint projection, trained together; ``forward`` is the student's."""

    def __init__(self, student: nn.Module, projection: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


@register_pass(DistillConfig)
def _run_distill(stage: Stage, config: DistillConfig, ctx: PassContext) -> PassResult:
    if stage.is_onnx:
        raise ConfigError(
            f"distill got the ONNX stage {stage.name!r} ({stage.onnx_path})",
            hint="distill trains a torch student: list distill (and prune) before export in the recipe",
        )
    prepared = ctx.prepared
    rul_cap = float(prepared.spec.rul_cap)
    teacher = copy.deepcopy(ctx.teacher).eval()
    params_teacher = count_parameters(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student_config = _student_config(config, ctx)
    adjacency = prepared.graph.normalized()
    example = torch.from_numpy(prepared.val.x[:2].copy())
    use_hint = config.hint_weight > 0
    if use_hint:
        for name, m in (("teacher", teacher), ("student", build_model(student_config, adjacency))):
            if not callable(getattr(m, "features", None)):
                raise ConfigError(
                    f"[distill] hint_weight={config.hint_weight}, but the {name} {type(m).__name__} has no features(x)",
                    hint="set hint_weight = 0 or use an STGNN / MLP model",
                )

    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        patience=config.patience,
        seed=ctx.seed,
        threads=ctx.threads,
    )

    # distilled student: seeded like the scratch baseline, the projection is built after it
    torch.manual_seed(ctx.seed)
    student = build_model(student_config, adjacency)
    projection = _projection(student, teacher, example) if use_hint else None
    wrapped = _Distilled(student, projection)
    steps_per_epoch = math.ceil(len(prepared.train) / config.batch_size)
    targets = _TeacherTargets(teacher, prepared.train.x, features=use_hint)
    loss_fn = _distill_loss(targets, config, rul_cap, config.epochs * steps_per_epoch)
    distilled = fit(
        wrapped,
        prepared.train,
        prepared.val,
        train_config,
        rul_cap=rul_cap,
        progress=ctx.progress,
        description=f"distill {config.student.value}",
        loss_fn=loss_fn,
    )
    student = wrapped.student.eval()

    # the same student without a teacher
    torch.manual_seed(ctx.seed)
    scratch_model = build_model(student_config, adjacency)
    scratch = fit(
        scratch_model,
        prepared.train,
        prepared.val,
        train_config,
        rul_cap=rul_cap,
        progress=ctx.progress,
        description=f"scratch {config.student.value}",
    )

    teacher_val = predict(teacher, prepared.val.x)
    record: dict[str, Any] = {
        "student": config.student.value,
        "student_config": student_config.to_dict(),
        "params_teacher": params_teacher,
        "params_student": count_parameters(student),
        "schedule": {
            "alpha_start": config.alpha_start,
            "alpha_end": config.alpha_end,
            "hint_weight": config.hint_weight,
            "steps": config.epochs * steps_per_epoch,
        },
        "teacher": {
            "val_rmse": evaluate(teacher, prepared.val)["rmse"],
            "test_rmse": evaluate(teacher, prepared.test)["rmse"],
        },
        "distilled": _summary(student, distilled, prepared, teacher_val),
        "scratch": _summary(scratch_model.eval(), scratch, prepared, teacher_val),
    }
    architecture = "mlp" if isinstance(student_config, MLPConfig) else "stgnn"
    return PassResult(
        Stage(name=f"distilled-{config.student.value}", torch_model=student, architecture=architecture), record
    )


def _student_config(config: DistillConfig, ctx: PassContext) -> ModelConfig:
    spec = ctx.prepared.spec
    common = {"num_nodes": spec.num_sensors, "window": spec.window, "rul_cap": spec.rul_cap}
    fields = dict(MODEL_PRESETS[config.student.value])
    fields.pop("kind")
    if config.student is Student.MLP:
        if config.hidden is not None:
            fields["hidden"] = config.hidden
        if config.temporal is not None:
            fields["temporal"] = config.temporal
        return MLPConfig(**common, **fields)
    for name in ("channels", "blocks", "head_hidden"):
        if getattr(config, name) is not None:
            fields[name] = getattr(config, name)
    # the student mixes sensors the way the teacher does (fixed Â by default)
    teacher_config = getattr(ctx.teacher, "config", None)
    fields["graph"] = teacher_config.graph if isinstance(teacher_config, STGNNConfig) else GraphMode.FIXED
    try:
        return STGNNConfig(**common, **fields)
    except ConfigError as exc:
        raise ConfigError(f"[distill] student {config.student.value}: {exc.message}", hint=exc.hint) from exc


def _projection(student: nn.Module, teacher: nn.Module, example: Tensor) -> nn.Module:
    """Learned map from the student's features to the teacher's (shapes read on ``example``)."""
    with torch.no_grad():
        fs = student.eval().features(example)  # type: ignore[operator]
        ft = teacher.features(example)  # type: ignore[operator]
    student.train()
    if isinstance(student, STGNN) and isinstance(teacher, STGNN):
        return nn.Conv2d(fs.shape[1], ft.shape[1], kernel_size=1)  # per node and time step
    return nn.Sequential(nn.Flatten(), nn.Linear(fs[0].numel(), ft[0].numel()))


class _TeacherTargets:
    """The frozen teacher's prediction (and features) per training window, computed once.

    :func:`edgeglm.training.fit` hands the loss a batch of windows, not their indices, and
    the teacher is a function of the window: its outputs are memoized by a 128-bit digest
    of the window's bytes. A window not seen here (none, in practice) is run through the
    teacher directly.
    """

    def __init__(self, teacher: nn.Module, x: np.ndarray, *, features: bool, batch_size: int = 1024) -> None:
        self.teacher = teacher
        self.features = features
        preds, feats = [], []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                p, f = self._run(torch.from_numpy(x[i : i + batch_size]))
                preds.append(p)
                feats.append(f)
        self.pred = torch.cat(preds) if preds else torch.zeros(0)
        self.feat = torch.cat(feats) if features and feats else None
        self.row = {_digest(w): i for i, w in enumerate(x)}

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.features:
            return self.teacher(x).reshape(-1), x.new_zeros(0)
        out, feat = _forward_with_features(self.teacher, x)
        return out.reshape(-1), feat

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(T(x), f_T(x) or None)`` for a batch ``(B, window, nodes)``."""
        rows = [self.row.get(_digest(w)) for w in x.numpy()]
        if any(r is None for r in rows):
            with torch.no_grad():
                p, f = self._run(x)
            return p, (f if self.features else None)
        idx = torch.tensor(rows)
        return self.pred[idx], (self.feat[idx] if self.feat is not None else None)


def _digest(window: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(window).tobytes(), digest_size=16).digest()


def _distill_loss(
    targets: _TeacherTargets, config: DistillConfig, rul_cap: float, total_steps: int
) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    step = 0

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        nonlocal step
        assert isinstance(model, _Distilled)
        alpha = alpha_at(step, total_steps, config.alpha_start, config.alpha_end)
        step += 1
        teacher_pred, teacher_feat = targets(x)
        if model.projection is None or teacher_feat is None:
            pred = model.student(x).reshape(-1) / rul_cap
            hint = pred.new_zeros(())
        else:
            out, fs = _forward_with_features(model.student, x)
            pred = out.reshape(-1) / rul_cap
            hint = nn.functional.mse_loss(model.projection(fs).reshape(teacher_feat.shape), teacher_feat)
        task = nn.functional.mse_loss(pred, y / rul_cap)
        soft = nn.functional.mse_loss(pred, teacher_pred / rul_cap)
        return (1 - alpha) * task + alpha * (soft + config.hint_weight * hint)

    return loss


def _forward_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(model(x), model.features(x))`` in one pass for the reference models."""
    if isinstance(model, STGNN):
        fs = model.features(x)
        return model.rul_cap * model.head(fs), fs
    if isinstance(model, MLPStudent):
        fs = model.features(x)
        return model.rul_cap * model.out(fs), fs
    return model(x), model.features(x)  # type: ignore[operator]


def _summary(model: nn.Module, result: Any, prepared: Any, teacher_val: np.ndarray) -> dict[str, Any]:
    return {
        "val_rmse": evaluate(model, prepared.val)["rmse"],
        "test_rmse": evaluate(model, prepared.test)["rmse"],
        "val_rmse_vs_teacher": rmse(predict(model, prepared.val.x), teacher_val),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
    }
