"""Windows of normalized sensor readings and their RUL targets (numpy only).

A :class:`WindowSpec` is everything the runtime needs to turn raw sensor rows
into model input the way training did: sensor order, window length, stride,
normalization statistics and the RUL cap. It serializes to JSON and travels in
the bundle, so the edge never needs torch or the training data.

Normalization is a z-score, per operating condition when the source has
several (C-MAPSS FD002/FD004, the simulator's load regimes)::

    c(row)  = argmin_k ‖(settings(row) − center_k) / scale‖          (nearest condition)
    z(row)  = (sensors(row) − μ_c) / σ_c                              (fitted on train only)

Targets follow the standard piecewise-linear RUL (Heimes, PHM08): the true RUL
capped at ``rul_cap`` (default 125 cycles), since early life carries no
degradation signal.

Dropouts (NaN readings) are held at the unit's last valid reading; a unit that
starts with a dropout uses the condition mean (0 after normalization). The
runtime's hold-last policy does the same, so training and edge agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edgeglm.data.table import SensorTable

__all__ = ["Normalization", "WindowSpec", "Windows", "fit_window_spec", "hold_last_valid"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """Per-condition z-score statistics.

    Args:
        centers: condition centers in settings space, ``(C, n_settings)``.
        scale: per-setting scale for the nearest-center distance, ``(n_settings,)``.
        mean: per-condition sensor means, ``(C, n_sensors)``.
        std: per-condition sensor standard deviations (> 0), ``(C, n_sensors)``.
    """

    centers: np.ndarray
    scale: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        for name in ("centers", "scale", "mean", "std"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        c = self.centers.shape[0]
        if self.mean.shape[0] != c or self.std.shape != self.mean.shape:
            raise ValueError("normalization: centers, mean and std disagree on the number of conditions")
        if np.any(self.std <= 0) or not np.all(np.isfinite(self.std)):
            raise ValueError("normalization: std must be finite and > 0")

    @property
    def num_conditions(self) -> int:
        return int(self.centers.shape[0])

    def condition(self, settings: np.ndarray) -> np.ndarray:
        """Nearest condition index per row. Shapes: ``(rows, n_settings)`` → ``(rows,)`` int64."""
        s = np.asarray(settings, dtype=np.float64)
        if self.num_conditions == 1:
            return np.zeros(s.shape[0], dtype=np.int64)
        d = ((s[:, None, :] - self.centers[None]) / self.scale) ** 2
        return np.argmin(np.nan_to_num(d, nan=np.inf).sum(axis=2), axis=1)

    def apply(self, sensors: np.ndarray, settings: np.ndarray) -> np.ndarray:
        """z-scores, float32, same shape as ``sensors`` (``(rows, n_sensors)``); NaN stays NaN."""
        c = self.condition(settings)
        return ((np.asarray(sensors, np.float64) - self.mean[c]) / self.std[c]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).tolist() for k in ("centers", "scale", "mean", "std")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return cls(**{k: np.asarray(d[k], np.float64) for k in ("centers", "scale", "mean", "std")})


@dataclass(frozen=True)
class Windows:
    """Model inputs and targets.

    Shapes: ``x`` ``(n, window, n_sensors)`` float32; ``y`` ``(n,)`` float32 (capped RUL);
    ``unit`` ``(n,)`` int64; ``cycle`` ``(n,)`` int64, the cycle of each window's last row.
    """

    x: np.ndarray
    y: np.ndarray
    unit: np.ndarray
    cycle: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


def hold_last_valid(z: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Forward-fill NaN down each column; leading NaN become ``fill``. Shape ``(rows, cols)`` kept."""
    z = np.array(z, dtype=np.float32, copy=True)
    if not np.isnan(z).any():
        return z
    rows = np.arange(z.shape[0])[:, None]
    idx = np.where(np.isnan(z), -1, rows)
    idx = np.maximum.accumulate(idx, axis=0)
    out = z[np.maximum(idx, 0), np.arange(z.shape[1])[None, :]]
    out[idx < 0] = fill
    return out


@dataclass(frozen=True)
class WindowSpec:
    """How raw rows become model windows; serialized into checkpoints and bundles.

    Args:
        sensor_names: sensors the model reads, in input order (the graph's node order).
        setting_names: operating settings used to pick the normalization condition.
        normalization: fitted statistics (train split only).
        window: rows per window (default: 30).
        stride: step between training windows (default: 1).
        rul_cap: cap of the piecewise-linear RUL target, in cycles (default: 125).
    """

    sensor_names: tuple[str, ...]
    setting_names: tuple[str, ...]
    normalization: Normalization
    window: int = 30
    stride: int = 1
    rul_cap: float = 125.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sensor_names", tuple(self.sensor_names))
        object.__setattr__(self, "setting_names", tuple(self.setting_names))
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window ({self.window}) and stride ({self.stride}) must be ≥ 1")
        if self.rul_cap <= 0:
            raise ValueError(f"rul_cap must be > 0, got {self.rul_cap}")
        if self.normalization.mean.shape[1] != len(self.sensor_names):
            raise ValueError("normalization statistics do not match the number of sensors")

    @property
    def num_sensors(self) -> int:
        return len(self.sensor_names)

    def normalize(self, table: SensorTable) -> np.ndarray:
        """Normalized readings of ``table`` with dropouts held per unit. ``(rows, n_sensors)`` float32."""
        t = table.select_sensors(self.sensor_names)
        z = self.normalization.apply(t.sensors, _settings_of(t, self.setting_names))
        if np.isnan(z).any():
            for _, sl in t.unit_slices():
                z[sl] = hold_last_valid(z[sl])
        return z

    def windows(self, table: SensorTable) -> Windows:
        """Every full window (step ``stride``) of every unit, with capped RUL at its last row."""
        z = self.normalize(table)
        xs, ys, us, cs = [], [], [], []
        for uid, sl in table.unit_slices():
            n = sl.stop - sl.start
            if n < self.window:
                continue
            view = np.lib.stride_tricks.sliding_window_view(z[sl], self.window, axis=0)  # (n-w+1, S, w)
            ends = np.arange(self.window - 1, n, self.stride)
            xs.append(view[ends - self.window + 1].transpose(0, 2, 1))
            ys.append(np.minimum(table.rul[sl][ends], self.rul_cap))
            us.append(np.full(len(ends), uid, np.int64))
            cs.append(table.cycle[sl][ends])
        return _stack(xs, ys, us, cs, self)

    def last_windows(self, table: SensorTable) -> Windows:
        """The last window of each unit (the test protocol); short units are front-padded
        by repeating their first row."""
        z = self.normalize(table)
        xs, ys, us, cs = [], [], [], []
        for uid, sl in table.unit_slices():
            zu = z[sl][-self.window :]
            if zu.shape[0] < self.window:
                zu = np.concatenate([np.repeat(zu[:1], self.window - zu.shape[0], axis=0), zu])
            xs.append(zu[None])
            ys.append([min(table.rul[sl.stop - 1], self.rul_cap)])
            us.append([uid])
            cs.append([table.cycle[sl.stop - 1]])
        return _stack(xs, ys, us, cs, self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "sensor_names": list(self.sensor_names),
            "setting_names": list(self.setting_names),
            "window": self.window,
            "stride": self.stride,
            "rul_cap": self.rul_cap,
            "normalization": self.normalization.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowSpec:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"window spec schema_version {version!r}; this EdgeGLM reads {SCHEMA_VERSION}")
        return cls(
            sensor_names=tuple(d["sensor_names"]),
            setting_names=tuple(d["setting_names"]),
            normalization=Normalization.from_dict(d["normalization"]),
            window=int(d["window"]),
            stride=int(d["stride"]),
            rul_cap=float(d["rul_cap"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> WindowSpec:
        return cls.from_dict(json.loads(text))


def _settings_of(table: SensorTable, names: tuple[str, ...]) -> np.ndarray:
    idx = [table.setting_names.index(n) for n in names]
    return table.settings[:, idx]


def _stack(xs: list, ys: list, us: list, cs: list, spec: WindowSpec) -> Windows:
    if not xs:
        empty = np.zeros((0, spec.window, spec.num_sensors), np.float32)
        return Windows(empty, np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Windows(
        np.ascontiguousarray(np.concatenate(xs), dtype=np.float32),
        np.concatenate(ys).astype(np.float32),
        np.concatenate(us).astype(np.int64),
        np.concatenate(cs).astype(np.int64),
    )


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; returns (centers (k, d), inertia)."""
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centers.append(x[rng.choice(len(x), p=p)])
    c = np.asarray(centers)
    for _ in range(iters):
        lab = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
        new = np.array([x[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    inertia = float(np.min(((x[:, None] - c[None]) ** 2).sum(-1), axis=1).sum())
    return c, inertia


def _find_conditions(settings: np.ndarray, conditions: int | Literal["auto"]) -> tuple[np.ndarray, np.ndarray]:
    """Condition centers and distance scale. ``auto`` picks the smallest k ≤ 10 whose k-means
    explains ≥ 99 % of the settings' variance (discrete regimes), else one condition."""
    s = settings[np.all(np.isfinite(settings), axis=1)]
    scale = s.std(axis=0) if len(s) else np.ones(settings.shape[1])
    scale[scale == 0] = 1.0
    if conditions == 1 or settings.shape[1] == 0 or len(s) == 0:
        return s.mean(axis=0, keepdims=True) if len(s) else np.zeros((1, settings.shape[1])), scale
    rng = np.random.default_rng(0)
    sample = (s[rng.choice(len(s), min(len(s), 4000), replace=False)] / scale).astype(np.float64)
    total = float(((sample - sample.mean(0)) ** 2).sum())
    ks = [conditions] if isinstance(conditions, int) else range(2, 11)
    for k in ks:
        c, inertia = _kmeans(sample, k, rng)
        if conditions != "auto" or inertia <= 0.01 * total:
            return c * scale, scale
    return s.mean(axis=0, keepdims=True), scale


def fit_window_spec(
    train: SensorTable,
    *,
    sensors: tuple[str, ...] | None = None,
    window: int = 30,
    stride: int = 1,
    rul_cap: float = 125.0,
    conditions: int | Literal["auto"] = "auto",
) -> WindowSpec:
    """Fit normalization on the training table and return the :class:`WindowSpec`.

    Args:
        train: the training split (never the test split).
        sensors: sensors to keep (default: every sensor of the table).
        window, stride, rul_cap: see :class:`WindowSpec`.
        conditions: number of operating conditions, or ``"auto"`` to detect discrete regimes.
    """
    names = tuple(sensors) if sensors is not None else train.sensor_names
    t = train.select_sensors(names)
    centers, scale = _find_conditions(t.settings, conditions)
    probe = Normalization(centers, scale, np.zeros((len(centers), len(names))), np.ones((len(centers), len(names))))
    cond = probe.condition(t.settings)
    mean = np.zeros((len(centers), len(names)))
    std = np.ones((len(centers), len(names)))
    for j in range(len(centers)):
        rows = t.sensors[cond == j]
        if len(rows):
            mean[j] = np.nanmean(rows, axis=0)
            sd = np.nanstd(rows, axis=0)
            std[j] = np.where(np.isfinite(sd) & (sd > 1e-8), sd, 1.0)
    return WindowSpec(names, t.setting_names, Normalization(centers, scale, mean, std), window, stride, rul_cap)
