from __future__ import annotations

import numpy as np
import pytest

from edgeglm.data.table import SensorTable
from edgeglm.windowing import WindowSpec, fit_window_spec, hold_last_valid


def _table(lengths: list[int], *, regimes: bool = False, seed: int = 0) -> SensorTable:
    rng = np.random.default_rng(seed)
    units, cycles, ruls = [], [], []
    for u, n in enumerate(lengths, start=1):
        units += [u] * n
        cycles += list(range(1, n + 1))
        ruls += list(range(n - 1, -1, -1))
    rows = len(units)
    settings = np.zeros((rows, 2))
    offset = np.zeros((rows, 1))
    if regimes:
        regime = rng.integers(0, 3, rows)
        settings = np.column_stack([regime * 10.0, regime * 0.5]) + rng.normal(0, 0.01, (rows, 2))
        offset = regime[:, None] * 100.0
    sensors = rng.normal(5.0, 2.0, (rows, 3)) + offset
    return SensorTable(
        np.asarray(units), np.asarray(cycles), settings, sensors, np.asarray(ruls, float), ("s1", "s2"), ("a", "b", "c")
    )


def test_windows_count_targets_and_cap() -> None:
    t = _table([50, 20, 31])
    spec = fit_window_spec(t, window=30, rul_cap=15)
    w = spec.windows(t)
    assert len(w) == (50 - 29) + 0 + (31 - 29)
    assert w.x.shape == (len(w), 30, 3) and w.x.dtype == np.float32
    assert w.y.max() == 15  # capped
    # unit 1 windows end at cycles 30, 31, …: true RUL 20, 19, …, capped at 15
    np.testing.assert_array_equal(w.y[:8], [15, 15, 15, 15, 15, 15, 14, 13])
    np.testing.assert_array_equal(w.cycle[:2], [30, 31])
    # the window content is the normalized rows of the unit
    z = spec.normalize(t)
    np.testing.assert_allclose(w.x[0], z[:30])


def test_last_windows_pad_short_units_by_repeating_first_row() -> None:
    t = _table([50, 10])
    spec = fit_window_spec(t, window=30)
    lw = spec.last_windows(t)
    assert len(lw) == 2
    z = spec.normalize(t)
    np.testing.assert_allclose(lw.x[1, :21], np.repeat(z[50:51], 21, axis=0))
    np.testing.assert_allclose(lw.x[1, 20:], z[50:60])
    np.testing.assert_array_equal(lw.y, [0.0, 0.0])


def test_normalization_is_fitted_per_regime_and_round_trips_through_json() -> None:
    t = _table([200, 200], regimes=True)
    spec = fit_window_spec(t, conditions="auto")
    assert spec.normalization.num_conditions == 3
    z = spec.normalize(t)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05  # regime offsets removed
    back = WindowSpec.from_json(spec.to_json())
    np.testing.assert_array_equal(back.windows(t).x, spec.windows(t).x)
    single = fit_window_spec(t, conditions=1)
    assert single.normalization.num_conditions == 1
    # one condition leaves the regime offsets in: rows of the highest regime sit far above the mean
    high = t.settings[:, 0] > 15
    assert float(single.normalize(t)[high].mean()) > 0.8
    assert not np.allclose(single.normalize(t), z)


def test_single_noisy_condition_is_not_split() -> None:
    """C-MAPSS FD001 settings are noise around one point: auto must find one condition."""
    t = _table([300])
    noisy = SensorTable(
        t.unit,
        t.cycle,
        np.random.default_rng(1).normal(0, 0.002, (300, 2)),
        t.sensors,
        t.rul,
        t.setting_names,
        t.sensor_names,
    )
    assert fit_window_spec(noisy).normalization.num_conditions == 1


def test_dropouts_are_held_at_last_valid_reading() -> None:
    z = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, np.nan], [4.0, 5.0]], np.float32)
    np.testing.assert_array_equal(hold_last_valid(z), [[0, 1], [2, 1], [2, 1], [4, 5]])
    t = _table([40])
    sensors = t.sensors.copy()
    sensors[10:13, 1] = np.nan
    t2 = SensorTable(t.unit, t.cycle, t.settings, sensors, t.rul, t.setting_names, t.sensor_names)
    spec = fit_window_spec(t2)
    z2 = spec.normalize(t2)
    assert not np.isnan(z2).any()
    np.testing.assert_array_equal(z2[10:13, 1], np.repeat(z2[9, 1], 3))


def test_bad_window_spec_values() -> None:
    t = _table([40])
    with pytest.raises(ValueError, match="window"):
        fit_window_spec(t, window=0)
    with pytest.raises(ValueError, match="rul_cap"):
        fit_window_spec(t, rul_cap=0)
    d = fit_window_spec(t).to_dict()
    d["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version"):
        WindowSpec.from_dict(d)
