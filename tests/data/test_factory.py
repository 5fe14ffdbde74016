"""The factory-line simulator: determinism, table layout, labels, dropouts, regimes, coupling, graph, config."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeglm.data.factory import LineConfig, Machine, MachineKind, line_graph, parse_factory_source, simulate_line
from edgeglm.data.table import Dataset
from edgeglm.errors import ConfigError
from edgeglm.windowing import fit_window_spec

SMALL = LineConfig(units_train=12, units_test=6)


@pytest.fixture(scope="module")
def default() -> Dataset:
    return simulate_line()


def _equal(a: Dataset, b: Dataset) -> bool:
    return all(
        np.array_equal(getattr(a, split).sensors, getattr(b, split).sensors, equal_nan=True)
        and np.array_equal(getattr(a, split).settings, getattr(b, split).settings)
        and np.array_equal(getattr(a, split).rul, getattr(b, split).rul)
        for split in ("train", "test")
    )


def _faulty_index(ds: Dataset) -> np.ndarray:
    names = [m["name"] for m in ds.meta["machines"]]
    return np.asarray([names.index(n) for n in ds.meta["train"]["failure_machine"]])


def _shift(z: np.ndarray, ds: Dataset, *, early: int = 40, late: int = 15) -> np.ndarray:
    """Per train unit: mean of the last ``late`` rows minus mean of the first ``early`` rows.

    Shapes: ``z`` ``(rows, …)`` → ``(units, …)``; NaN (dropouts) are ignored.
    """
    return np.stack([np.nanmean(z[sl][-late:], 0) - np.nanmean(z[sl][:early], 0) for _, sl in ds.train.unit_slices()])


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_arrays() -> None:
    assert _equal(simulate_line(SMALL, seed=7), simulate_line(SMALL, seed=7))


def test_other_seed_gives_other_data() -> None:
    a, b = simulate_line(SMALL, seed=1), simulate_line(SMALL, seed=2)
    assert not np.array_equal(a.train.sensors, b.train.sensors, equal_nan=True)
    assert a.meta["train"]["failure_cycle"] != b.meta["train"]["failure_cycle"]


def test_adding_units_keeps_existing_units() -> None:
    small = simulate_line(SMALL, seed=3)
    big = simulate_line(LineConfig(units_train=20, units_test=6), seed=3)
    ids = small.train.units
    assert np.array_equal(big.train.select_units(ids).sensors, small.train.sensors, equal_nan=True)


def test_default_generation_is_fast() -> None:
    started = time.perf_counter()
    simulate_line()
    assert time.perf_counter() - started < 2.0


# -- table layout -----------------------------------------------------------------------------


def test_names_and_shapes(default: Dataset) -> None:
    cfg = LineConfig()
    names = default.train.sensor_names
    assert names == default.test.sensor_names == cfg.sensor_names
    assert 16 <= len(names) <= 20
    machines = [m.name for m in cfg.machines]
    assert machines == ["inlet_pump", "compressor", "main_motor", "conveyor", "outlet_pump"]
    for name in names:
        machine, quantity = name.split(".")
        assert machine in machines
        assert quantity in {"vibration", "temperature", "current", "pressure", "flow"}
    assert all(3 <= len(m.sensors) <= 4 for m in cfg.machines)
    assert default.train.setting_names == ("load_pct", "speed_rpm")
    assert len(default.train.units) == 80 and len(default.test.units) == 40
    assert default.name == "factory"
    assert default.train.sensors.shape == (len(default.train), len(names))


def test_lengths_like_cmapss_fd001(default: Dataset) -> None:
    lengths = np.asarray([sl.stop - sl.start for _, sl in default.train.unit_slices()])
    assert lengths.min() >= 120 and lengths.max() <= 350
    assert 180 <= lengths.mean() <= 290


def test_readings_are_plausible_physical_values(default: Dataset) -> None:
    x = default.train.sensors
    units = default.meta["units"]
    assert units["vibration"] == "mm/s" and units["temperature"] == "°C" and units["flow"] == "m³/h"
    for j, name in enumerate(default.train.sensor_names):
        col = x[:, j][np.isfinite(x[:, j])]
        quantity = name.split(".")[1]
        low, high = {
            "vibration": (0.3, 15.0),
            "temperature": (20.0, 130.0),
            "current": (5.0, 400.0),
            "pressure": (1.0, 25.0),
            "flow": (5.0, 150.0),
        }[quantity]
        assert low < col.min() and col.max() < high, name


def test_meta_is_json_and_complete(default: Dataset) -> None:
    json.dumps(default.meta)
    machines = [m["name"] for m in default.meta["machines"]]
    for split, table in (("train", default.train), ("test", default.test)):
        meta = default.meta[split]
        n = len(table.units)
        assert meta["unit"] == [int(u) for u in table.units]
        assert len(meta["failure_machine"]) == len(meta["failure_cycle"]) == len(meta["onset_cycle"]) == n
        assert set(meta["failure_machine"]) <= set(machines)
        assert all(o < f for o, f in zip(meta["onset_cycle"], meta["failure_cycle"], strict=True))
    assert len(set(default.meta["train"]["failure_machine"])) == len(machines)


# -- labels -----------------------------------------------------------------------------------


def test_train_units_run_to_failure(default: Dataset) -> None:
    t = default.train
    for (_, sl), failure in zip(t.unit_slices(), default.meta["train"]["failure_cycle"], strict=True):
        assert np.array_equal(t.cycle[sl], np.arange(1, sl.stop - sl.start + 1))
        assert np.all(np.diff(t.rul[sl]) == -1)
        assert t.rul[sl][-1] == 0
        assert t.cycle[sl][-1] == failure
        assert np.array_equal(t.rul[sl], failure - t.cycle[sl])


def test_test_units_stop_before_failure(default: Dataset) -> None:
    t = default.test
    _, end_rul = default.test_targets()
    assert np.all(end_rul > 0)
    cfg = LineConfig()
    assert np.all((end_rul >= cfg.test_rul_cycles[0]) & (end_rul <= cfg.test_rul_cycles[1]))
    for (_, sl), failure in zip(t.unit_slices(), default.meta["test"]["failure_cycle"], strict=True):
        assert np.all(np.diff(t.rul[sl]) == -1)
        assert t.rul[sl][-1] == failure - t.cycle[sl][-1]
        assert sl.stop - sl.start >= 31
    assert len(np.unique(end_rul)) > 20


# -- dropouts ---------------------------------------------------------------------------------


def test_dropouts_near_configured_rate_and_only_in_sensors(default: Dataset) -> None:
    for table in (default.train, default.test):
        share = np.isnan(table.sensors).mean()
        assert 0.5 * 0.002 < share < 1.5 * 0.002
        assert np.all(np.isfinite(table.settings)) and np.all(np.isfinite(table.rul))
    col = np.isnan(default.train.sensors).astype(int)
    runs = col[1:] & col[:-1]
    assert runs.sum() > 0, "some dropouts span consecutive rows"
    clean = simulate_line(LineConfig(units_train=5, units_test=2, dropout_rate=0.0))
    assert not np.isnan(clean.train.sensors).any()


# -- regimes ----------------------------------------------------------------------------------


def test_regimes_are_discrete_and_found_by_auto_conditions(default: Dataset) -> None:
    regimes = np.asarray(LineConfig().regimes)
    s = default.train.settings
    nearest = np.argmin(np.abs(s[:, None, :] - regimes[None]).sum(-1), axis=1)
    jitter = np.abs(s - regimes[nearest]).max(0)
    assert jitter[0] < 0.5 and jitter[1] < 5.0, "load within 0.5 %, speed within 5 rpm of a setpoint"
    assert set(nearest) == set(range(len(regimes)))
    switches = sum(int(np.count_nonzero(np.diff(nearest[sl]))) for _, sl in default.train.unit_slices())
    assert switches > 3 * len(default.train.units), "regimes change during a unit's life"
    assert fit_window_spec(default.train, conditions="auto").normalization.num_conditions == len(regimes)


def test_regimes_shift_sensor_levels(default: Dataset) -> None:
    spec = fit_window_spec(default.train, conditions="auto")
    mean, std = spec.normalization.mean, spec.normalization.std
    spread = (mean.max(0) - mean.min(0)) / std.mean(0)
    assert np.all(spread > 2.0), "every sensor's level moves by several within-regime stds across regimes"


def test_two_regimes_give_two_conditions() -> None:
    ds = simulate_line(LineConfig(units_train=10, units_test=2, regimes=((50, 1000), (90, 1700))))
    assert fit_window_spec(ds.train, conditions="auto").normalization.num_conditions == 2


# -- degradation and coupling -----------------------------------------------------------------


def _coupled_shift(ds: Dataset, *, contrast: bool) -> tuple[np.ndarray, np.ndarray]:
    """Late-minus-early shift of each downstream machine's current (regime removed by per-regime z-scores),
    for units whose upstream neighbour failed vs units where a machine ≥ 2 steps away failed.

    With ``contrast``, the current is compared with the mean of its own machine's other sensors
    (its graph neighbours there), which carry the same disturbance but not the coupling.
    """
    z = fit_window_spec(ds.train, conditions="auto").normalize(ds.train)
    names = ds.train.sensor_names
    machines = [m["name"] for m in ds.meta["machines"]]
    faulty = _faulty_index(ds)
    near, far = [], []
    for i in range(1, len(machines)):
        own = [j for j, n in enumerate(names) if n.startswith(machines[i] + ".")]
        current = names.index(f"{machines[i]}.current")
        signal = z[:, current]
        if contrast:
            signal = signal - z[:, [j for j in own if j != current]].mean(1)
        shift = _shift(signal, ds)
        near.append(shift[faulty == i - 1])
        far.append(shift[np.abs(faulty - i) >= 2])
    return np.concatenate(near), np.concatenate(far)


def _welch_t(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def test_fault_shows_in_neighbouring_machine_coupled_sensor() -> None:
    # without the shared disturbance the coupling is visible in the raw (regime-normalized) sensor
    ds = simulate_line(LineConfig(units_train=100, units_test=2, disturbance=0.0))
    near, far = _coupled_shift(ds, contrast=False)
    assert near.mean() > 0.3 and abs(far.mean()) < 0.15
    assert _welch_t(near, far) > 5.0


def test_graph_neighbours_recover_the_coupling_under_the_disturbance() -> None:
    # with the default disturbance, the single sensor barely shows the neighbour's fault;
    # compared with its graph neighbours (same machine) it shows it clearly
    ds = simulate_line(LineConfig(units_train=150, units_test=2))
    t_single = _welch_t(*_coupled_shift(ds, contrast=False))
    t_graph = _welch_t(*_coupled_shift(ds, contrast=True))
    assert t_graph > 10.0
    assert t_graph > 5.0 * abs(t_single)


def test_single_sensor_degradation_is_weak_against_the_disturbance(default: Dataset) -> None:
    # the faulty machine's vibration: its late-life rise is small next to its unit-to-unit
    # spread (the disturbance), but large next to the spread of its contrast with its machine mates
    z = fit_window_spec(default.train, conditions="auto").normalize(default.train)
    names = default.train.sensor_names
    machines = [m["name"] for m in default.meta["machines"]]
    single, contrast = [], []
    for (_, sl), f in zip(default.train.unit_slices(), _faulty_index(default), strict=True):
        own = [j for j, n in enumerate(names) if n.startswith(machines[f] + ".")]
        vib = names.index(f"{machines[f]}.vibration")
        others = [j for j in own if j != vib]
        zu = z[sl]
        single.append(zu[-15:, vib].mean() - zu[:40, vib].mean())
        diff = zu[:, vib] - zu[:, others].mean(1)
        contrast.append(diff[-15:].mean() - diff[:40].mean())
    single, contrast = np.asarray(single), np.asarray(contrast)
    snr_single = single.mean() / single.std()
    snr_contrast = contrast.mean() / contrast.std()
    assert snr_single < 1.0
    assert snr_contrast > 3.0 * snr_single


# -- graph ------------------------------------------------------------------------------------


def test_graph_edges_reference_sensors_and_cross_machines(default: Dataset) -> None:
    names = set(default.train.sensor_names)
    edges = default.graph_edges
    assert edges
    assert all(a in names and b in names and a != b and w > 0 for a, b, w in edges)
    cross = [(a, b) for a, b, _ in edges if a.split(".")[0] != b.split(".")[0]]
    assert len(cross) == len(LineConfig().machines) - 1
    for m in LineConfig().machines:  # each machine is a clique
        s = m.sensors
        inside = {frozenset((a, b)) for a, b, _ in edges if a in s and b in s}
        assert len(inside) == len(s) * (len(s) - 1) // 2


def test_line_graph_is_the_dataset_graph(default: Dataset) -> None:
    g = line_graph()
    assert g.nodes == default.train.sensor_names
    assert g.num_edges == len(default.graph_edges)
    i, j = g.nodes.index("inlet_pump.pressure"), g.nodes.index("compressor.current")
    assert g.adjacency[i, j] > 0
    k = g.nodes.index("outlet_pump.flow")
    assert g.adjacency[i, k] == 0


def test_custom_line() -> None:
    cfg = LineConfig(
        machines=(("feed", "conveyor"), ("press_drive", "motor"), ("cooler", "pump")),
        units_train=4,
        units_test=2,
    )
    assert cfg.machines[1] == Machine("press_drive", MachineKind.MOTOR)
    ds = simulate_line(cfg)
    assert ds.train.sensor_names[0].startswith("feed.")
    assert line_graph(cfg).num_nodes == len(ds.train.sensor_names)


# -- source string and config -----------------------------------------------------------------


def test_source_names_seed_and_changed_fields() -> None:
    assert simulate_line(LineConfig(), seed=0).source == "factory"
    assert simulate_line(seed=5).source == "factory?seed=5"
    src = simulate_line(SMALL, seed=2).source
    assert src == "factory?seed=2&units_train=12&units_test=6"
    assert parse_factory_source(src) == (SMALL, 2)
    odd = LineConfig(
        machines=(("a", "pump"), ("b", "motor")), regimes=((70, 1400),), life_cycles=(150, 200), noise=0.25
    )
    assert parse_factory_source(simulate_line(odd, seed=9).source) == (odd, 9)


def test_parse_factory_source_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="colour"):
        parse_factory_source("factory?seed=1&colour=red")
    with pytest.raises(ConfigError):
        parse_factory_source("cmapss:/data")


def test_config_round_trips_as_dict() -> None:
    cfg = LineConfig(noise=0.3, regimes=((60, 1200), (90, 1600)))
    assert LineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="nois"):
        LineConfig.from_dict({"nois": 0.3})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("units_train", 0),
        ("units_test", 2.5),
        ("noise", -0.1),
        ("disturbance", float("nan")),
        ("coupling", 1.5),
        ("fault_strength", 0.0),
        ("dropout_rate", 0.5),
        ("initial_wear", 0.9),
        ("life_cycles", (300, 100)),
        ("life_cycles", (10, 100)),
        ("degradation_cycles", (50, 500)),
        ("regime_dwell_cycles", (0, 10)),
        ("test_rul_cycles", (0, 50)),
        ("transport_delay_cycles", -1),
        ("disturbance_cycles", 0.5),
        ("regimes", ()),
        ("regimes", ((200, 1500),)),
        ("regimes", ((60, 1200), (60, 1200))),
        ("machines", (("solo", "pump"),)),
        ("machines", (("a", "pump"), ("a", "motor"))),
        ("schema_version", 2),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        LineConfig(**{field: value})
    assert err.value.hint


def test_bad_machine_names_the_problem() -> None:
    with pytest.raises(ConfigError, match="kind"):
        LineConfig(machines=(("a", "pump"), ("b", "turbine")))
    with pytest.raises(ConfigError, match="name"):
        LineConfig(machines=(("a", "pump"), ("B.x", "motor")))


def test_bad_seed() -> None:
    with pytest.raises(ConfigError, match="seed"):
        simulate_line(SMALL, seed=-1)
