"""The sensor table every data source produces (numpy only).

A table has the shape of the C-MAPSS text files — one row per unit and cycle:
``unit, cycle, settings…, sensors…`` — plus the RUL label of every row. Both the
C-MAPSS loader and the factory-line simulator return it, so windowing,
training and replay never care where rows came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "SensorTable"]


@dataclass(frozen=True)
class SensorTable:
    """Rows of sensor readings grouped in units (run-to-failure trajectories).

    Rows of one unit are contiguous and sorted by cycle.

    Args:
        unit: unit (engine / line run) id per row. Shape ``(rows,)``, int64.
        cycle: cycle (time step) per row, 1-based. Shape ``(rows,)``, int64.
        settings: operating settings per row. Shape ``(rows, n_settings)``, float64.
        sensors: sensor readings per row. Shape ``(rows, n_sensors)``, float64; NaN is a dropout.
        rul: true remaining useful life (cycles) per row, uncapped. Shape ``(rows,)``, float64.
        setting_names: one name per settings column.
        sensor_names: one name per sensors column.
    """

    unit: np.ndarray
    cycle: np.ndarray
    settings: np.ndarray
    sensors: np.ndarray
    rul: np.ndarray
    setting_names: tuple[str, ...]
    sensor_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.unit.shape[0]
        for name in ("cycle", "settings", "sensors", "rul"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"SensorTable.{name} has {getattr(self, name).shape[0]} rows, unit has {n}")
        if self.settings.ndim != 2 or self.settings.shape[1] != len(self.setting_names):
            raise ValueError(f"settings shape {self.settings.shape} does not match {len(self.setting_names)} names")
        if self.sensors.ndim != 2 or self.sensors.shape[1] != len(self.sensor_names):
            raise ValueError(f"sensors shape {self.sensors.shape} does not match {len(self.sensor_names)} names")

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    @property
    def units(self) -> np.ndarray:
        """Distinct unit ids in order of first appearance. Shape ``(n_units,)``."""
        _, first = np.unique(self.unit, return_index=True)
        return self.unit[np.sort(first)]

    def unit_slices(self) -> Iterator[tuple[int, slice]]:
        """Yield ``(unit id, row slice)`` for every unit, in table order."""
        if len(self) == 0:
            return
        change = np.flatnonzero(np.diff(self.unit)) + 1
        starts = np.concatenate([[0], change])
        stops = np.concatenate([change, [len(self)]])
        for a, b in zip(starts, stops, strict=True):
            yield int(self.unit[a]), slice(int(a), int(b))

    def select_units(self, ids: Sequence[int] | np.ndarray) -> SensorTable:
        """A new table with only the rows of the given units (table order kept)."""
        mask = np.isin(self.unit, np.asarray(ids))
        return self.take(mask)

    def take(self, rows: np.ndarray) -> SensorTable:
        """A new table with the selected rows (boolean mask or integer index)."""
        return SensorTable(
            unit=self.unit[rows],
            cycle=self.cycle[rows],
            settings=self.settings[rows],
            sensors=self.sensors[rows],
            rul=self.rul[rows],
            setting_names=self.setting_names,
            sensor_names=self.sensor_names,
        )

    def select_sensors(self, names: Sequence[str]) -> SensorTable:
        """A new table keeping only the named sensor columns, in the given order."""
        missing = [n for n in names if n not in self.sensor_names]
        if missing:
            raise KeyError(f"sensors {missing} not in table; it has {list(self.sensor_names)}")
        idx = [self.sensor_names.index(n) for n in names]
        return SensorTable(
            unit=self.unit,
            cycle=self.cycle,
            settings=self.settings,
            sensors=self.sensors[:, idx],
            rul=self.rul,
            setting_names=self.setting_names,
            sensor_names=tuple(names),
        )

    def to_text(self, path: Path) -> None:
        """Write the table in the C-MAPSS text format (space separated, no header, no RUL)."""
        cols = np.column_stack([self.unit, self.cycle, self.settings, self.sensors])
        fmt = ["%d", "%d"] + ["%.6g"] * (cols.shape[1] - 2)
        np.savetxt(path, cols, fmt=fmt, delimiter=" ")


@dataclass(frozen=True)
class Dataset:
    """A train/test pair as the standard prognostics protocol uses it.

    ``train`` runs to failure; ``test`` trajectories stop before failure and the
    target is the RUL at the last row of each test unit (``test.rul`` there).

    Args:
        name: a short name for reports (``"FD001"``, ``"factory"``).
        train: run-to-failure units.
        test: truncated units.
        source: the data source string that reproduces this data set (``"factory"``,
            ``"cmapss:/path?subset=FD001"``); recorded in checkpoints.
        graph_edges: optional ground-truth sensor graph as weighted edges between sensor
            names; ``None`` when the source has none (C-MAPSS).
        meta: free description for reports (JSON-serialisable values only).
    """

    name: str
    train: SensorTable
    test: SensorTable
    source: str
    graph_edges: tuple[tuple[str, str, float], ...] | None = None
    meta: dict = field(default_factory=dict)

    def test_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Per test unit: ``(unit ids, true RUL at the unit's last row)``."""
        ids, last = [], []
        for uid, sl in self.test.unit_slices():
            ids.append(uid)
            last.append(self.test.rul[sl.stop - 1])
        return np.asarray(ids, dtype=np.int64), np.asarray(last, dtype=np.float64)
