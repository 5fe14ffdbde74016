from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.data.table import SensorTable
from edgeglm.errors import BackendError, ConfigError
from edgeglm.runtime.alarms import AlarmCleared, AlarmConfig, AlarmRaised
from edgeglm.runtime.predictor import (
    Action,
    BadKind,
    BadRowPolicy,
    Prediction,
    Predictor,
    Row,
    RowRejected,
    SensorFault,
    Warmup,
)
from edgeglm.windowing import Normalization, WindowSpec, fit_window_spec

WINDOW = 12
ALARM = AlarmConfig(rul_low=30, rul_clear=40, debounce=2)


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> tuple[WindowSpec, SensorTable]:
    """A small simulated line with frequent dropout bursts; spec fitted on train (3 regimes)."""
    ds = simulate_line(LineConfig(units_train=5, units_test=6, dropout_rate=0.03), seed=1)
    spec = fit_window_spec(ds.train, window=WINDOW, conditions="auto")
    assert spec.normalization.num_conditions == 3
    assert np.isnan(ds.test.sensors).any()
    return spec, ds.test


def linear_model(spec: WindowSpec, *, column: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A fixed linear model; batch-invariant (each output depends only on its own window)."""
    w = np.random.default_rng(7).standard_normal((spec.window, spec.num_sensors)).astype(np.float32)

    def infer(x: np.ndarray) -> np.ndarray:
        out = (x * w).reshape(len(x), -1).sum(axis=1) + np.float32(60.0)
        return out[:, None] if column else out

    return infer


def table_rows(table: SensorTable, spec: WindowSpec) -> list[dict]:
    """The table as JSON-like row dicts, in table order."""
    t = table.select_sensors(spec.sensor_names)
    set_idx = [table.setting_names.index(n) for n in spec.setting_names]
    rows = []
    for i in range(len(t)):
        d: dict = {"stream": str(int(t.unit[i])), "t": int(t.cycle[i])}
        d.update(zip(spec.sensor_names, t.sensors[i].tolist(), strict=True))
        d.update(zip(spec.setting_names, t.settings[i, set_idx].tolist(), strict=True))
        rows.append(d)
    return rows


def predictions(events: list) -> list[tuple[str, float, float]]:
    return [(e.stream, e.t, e.rul) for e in events if isinstance(e, Prediction)]


def without_latency(events: list) -> list[dict]:
    out = []
    for e in events:
        d = e.to_dict()
        d.pop("latency_us", None)
        out.append(d)
    return out


def tiny_onnx_infer(spec: WindowSpec) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime session of Reshape → MatMul → Add → Relu, output ``rul`` (batch, 1)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    n = spec.window * spec.num_sensors
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((n, 8)) * 0.3).astype(np.float32)
    w2 = np.abs(rng.standard_normal((8, 1))).astype(np.float32) * 5
    nodes = [
        helper.make_node("Reshape", ["window", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b"], ["rul"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", spec.window, spec.num_sensors])],
        [helper.make_tensor_value_info("rul", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.array([-1, n], np.int64), "shape"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array([20.0], np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["rul"], {"window": x})[0]


# -- streaming == batch == training -------------------------------------------------------


def test_replay_equals_the_training_windows(data: tuple[WindowSpec, SensorTable]) -> None:
    spec, table = data
    infer = linear_model(spec)
    preds = Predictor(spec, infer, alarm=ALARM, max_batch=16).replay(table)
    w = spec.windows(table)  # stride 1: every full window, as training builds them
    assert len(preds) == len(w) > 0
    np.testing.assert_array_equal([p.rul for p in preds], infer(w.x))
    assert [(p.stream, p.t) for p in preds] == [(str(u), int(c)) for u, c in zip(w.unit, w.cycle, strict=True)]
    assert all(p.health == min(max(p.rul / spec.rul_cap, 0.0), 1.0) for p in preds)


def test_push_row_by_row_equals_replay_bitwise(data: tuple[WindowSpec, SensorTable]) -> None:
    spec, table = data
    infer = linear_model(spec, column=True)
    p = Predictor(spec, infer, alarm=ALARM)
    events = [e for r in table_rows(table, spec) for e in p.push(r)]
    batch = Predictor(spec, infer, alarm=ALARM).replay(table)
    assert predictions(events) == [(b.stream, b.t, b.rul) for b in batch]
    held = int(np.isnan(table.select_sensors(spec.sensor_names).sensors).sum())
    assert p.counters.held == held == p.counters.total(BadKind.NAN) > 0
    assert p.counters.accepted == p.counters.rows == len(table)


def test_push_many_interleaved_equals_push_and_replay(data: tuple[WindowSpec, SensorTable]) -> None:
    spec, table = data
    infer = linear_model(spec)
    rows = table_rows(table, spec)
    rows.sort(key=lambda r: (r["t"], int(r["stream"])))  # streams interleaved, each in order
    one = Predictor(spec, infer, alarm=ALARM)
    pushed = [e for r in rows for e in one.push(r)]
    many = Predictor(spec, infer, alarm=ALARM, max_batch=7)
    batched = many.push_many(rows[:500]) + many.push_many(rows[500:])
    assert without_latency(batched) == without_latency(pushed)
    assert one.counters == many.counters
    replayed = sorted((b.stream, b.t, b.rul) for b in one.replay(table))
    assert sorted(predictions(pushed)) == replayed


def test_pad_warmup_matches_last_windows_of_every_prefix(data: tuple[WindowSpec, SensorTable]) -> None:
    spec, table = data
    infer = linear_model(spec)
    unit = table.select_units([int(table.unit[0])])
    p = Predictor(spec, infer, alarm=ALARM, warmup=Warmup.PAD)
    events = [e for r in table_rows(unit, spec) for e in p.push(r)]
    preds = predictions(events)
    assert len(preds) == len(unit)  # one per row, from the first
    for k in range(1, WINDOW + 4):
        expected = infer(spec.last_windows(unit.take(np.arange(k))).x)
        assert preds[k - 1][2] == expected[0], k
    assert [(b.stream, b.t, b.rul) for b in p.replay(unit)] == preds


def test_onnxruntime_session_streaming_equals_batch(data: tuple[WindowSpec, SensorTable]) -> None:
    spec, table = data
    infer = tiny_onnx_infer(spec)
    rows = table_rows(table, spec)
    one = Predictor(spec, infer, alarm=ALARM)
    pushed = predictions([e for r in rows for e in one.push(r)])
    batched = predictions(Predictor(spec, infer, alarm=ALARM, max_batch=32).push_many(rows))
    expected = infer(spec.windows(table).x).reshape(-1)
    assert [k[:2] for k in pushed] == [k[:2] for k in batched]
    np.testing.assert_allclose([k[2] for k in pushed], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([k[2] for k in batched], expected, rtol=1e-6, atol=1e-6)


# -- bad rows -----------------------------------------------------------------------------


def _unit(data: tuple[WindowSpec, SensorTable]) -> tuple[WindowSpec, SensorTable, list[dict]]:
    """One unit without dropouts (so each test controls the bad readings)."""
    spec, table = data
    unit = table.select_units([int(table.unit[0])])
    clean = SensorTable(
        unit.unit, unit.cycle, unit.settings, np.nan_to_num(unit.sensors, nan=1.0), unit.rul,
        unit.setting_names, unit.sensor_names,
    )  # fmt: skip
    return spec, clean, table_rows(clean, spec)


def _with_nan(table: SensorTable, row: int, sensor: str) -> SensorTable:
    sensors = table.sensors.copy()
    sensors[row, table.sensor_names.index(sensor)] = np.nan
    return SensorTable(
        table.unit, table.cycle, table.settings, sensors, table.rul, table.setting_names, table.sensor_names
    )


BAD_VALUES = {
    BadKind.NAN: math.nan,
    BadKind.INF: -math.inf,
    BadKind.NON_NUMERIC: "sensor offline",
    BadKind.MISSING: None,  # the key is removed
}


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_bad_reading_is_held_like_the_batch_path_holds_nan(data, kind: BadKind) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    sensor, k = spec.sensor_names[2], WINDOW + 3
    if kind is BadKind.MISSING:
        del rows[k][sensor]
    else:
        rows[k][sensor] = BAD_VALUES[kind]
    p = Predictor(spec, infer, alarm=ALARM)
    events = [e for r in rows for e in p.push(r)]
    expected = p.replay(_with_nan(clean, k, sensor))  # training holds NaN at the last valid value
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in expected]
    assert p.counters.bad == {(kind, sensor): 1}
    assert p.counters.held == 1 and p.counters.accepted == len(rows)
    assert not [e for e in events if isinstance(e, (RowRejected, SensorFault))]


def test_extra_keys_are_ignored_and_counted(data) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    rows[5]["spindle.rpm"] = 1200.0
    rows[6]["spindle.rpm"] = "x"
    p = Predictor(spec, infer, alarm=ALARM)
    events = [e for r in rows for e in p.push(Row.from_mapping(r))]
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(clean)]
    assert p.counters.bad == {(BadKind.EXTRA, "spindle.rpm"): 2}
    assert p.counters.accepted == len(rows)


@pytest.mark.parametrize("kind", [BadKind.DUPLICATE, BadKind.OUT_OF_ORDER])
def test_bad_timestamps_are_dropped_by_default(data, kind: BadKind) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    k = WINDOW + 2
    late = dict(rows[k - 1] if kind is BadKind.DUPLICATE else rows[k - 3])
    late["t"] = rows[k - 1]["t"] if kind is BadKind.DUPLICATE else rows[k - 3]["t"]
    stream = [*rows[:k], late, *rows[k:]]
    p = Predictor(spec, infer, alarm=ALARM)
    events = [e for r in stream for e in p.push(r)]
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(clean)]
    assert p.counters.bad == {(kind, ""): 1}
    assert (p.counters.dropped, p.counters.rejected, p.counters.accepted) == (1, 0, len(rows))
    assert not [e for e in events if isinstance(e, (RowRejected, SensorFault))]


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        (BadKind.NAN, lambda r, s: r.__setitem__(s, math.nan)),
        (BadKind.INF, lambda r, s: r.__setitem__(s, math.inf)),
        (BadKind.MISSING, lambda r, s: r.pop(s)),
        (BadKind.NON_NUMERIC, lambda r, s: r.__setitem__(s, [1, 2])),
        (BadKind.EXTRA, lambda r, s: r.__setitem__("bogus", 1.0)),
        (BadKind.DUPLICATE, lambda r, s: r.__setitem__("t", r["t"] - 1)),
        (BadKind.OUT_OF_ORDER, lambda r, s: r.__setitem__("t", r["t"] - 5)),
    ],
)
@pytest.mark.parametrize("action", [Action.DROP, Action.REJECT])
def test_drop_and_reject_skip_the_row_and_the_loop_goes_on(data, kind: BadKind, mutate, action: Action) -> None:
    """The bad row is *replaced* by a mutated copy: skipping it must equal a table without that row."""
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    k, sensor = WINDOW + 4, spec.sensor_names[0]
    mutate(rows[k], sensor)
    p = Predictor(spec, infer, alarm=ALARM, policy=BadRowPolicy(**{kind.value: action}))
    events = [e for r in rows for e in p.push(r)]
    keep = np.ones(len(clean), bool)
    keep[k] = False
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(clean.take(keep))]
    rejected = [e for e in events if isinstance(e, RowRejected)]
    label = "bogus" if kind is BadKind.EXTRA else "" if kind in (BadKind.DUPLICATE, BadKind.OUT_OF_ORDER) else sensor
    if action is Action.REJECT:
        assert [(e.stream, e.t, e.reasons) for e in rejected] == [(rows[k]["stream"], rows[k]["t"], ((kind, label),))]
    else:
        assert rejected == []
    c = p.counters
    assert c.bad == {(kind, label): 1}
    assert (c.dropped, c.rejected) == ((1, 0) if action is Action.DROP else (0, 1))
    assert c.rows == c.accepted + c.dropped + c.rejected == len(rows)


@pytest.mark.parametrize("row", [{"t": 3, "a": 1.0}, {"stream": "u", "t": math.nan}, {"stream": 1.5, "t": 2}, 42, None])
def test_malformed_rows_are_rejected(data, row: object) -> None:
    spec, _, _ = _unit(data)
    p = Predictor(spec, linear_model(spec), alarm=ALARM)
    events = p.push(row)  # type: ignore[arg-type]
    assert len(events) == 1 and isinstance(events[0], RowRejected)
    assert events[0].reasons == ((BadKind.MALFORMED, ""),)
    assert p.counters.rejected == 1 and p.counters.bad == {(BadKind.MALFORMED, ""): 1}
    json.dumps(events[0].to_dict(), allow_nan=False)


def test_missing_setting_holds_the_last_setting(data) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    k = WINDOW + 1
    setting = spec.setting_names[1]
    del rows[k][setting]
    settings = clean.settings.copy()
    settings[k, clean.setting_names.index(setting)] = settings[k - 1, clean.setting_names.index(setting)]
    held = SensorTable(
        clean.unit, clean.cycle, settings, clean.sensors, clean.rul, clean.setting_names, clean.sensor_names
    )
    p = Predictor(spec, infer, alarm=ALARM)
    events = [e for r in rows for e in p.push(r)]
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(held)]
    assert p.counters.bad == {(BadKind.MISSING, setting): 1} and p.counters.held == 1


def test_max_hold_exceeded_emits_one_sensor_fault_per_run_and_keeps_holding(data) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    sensor, start, run = spec.sensor_names[1], WINDOW + 2, 4
    policy = BadRowPolicy(max_hold=2)
    bad_table = clean
    for i in [*range(start, start + run), start + run + 1, start + run + 2, start + run + 3]:
        rows[i][sensor] = math.nan
        bad_table = _with_nan(bad_table, i, sensor)
    p = Predictor(spec, infer, alarm=ALARM, policy=policy)
    faults = []
    for r in rows:
        faults += [(e.t, e.sensor, e.kind, e.bad_rows) for e in p.push(r) if isinstance(e, SensorFault)]
    # runs of 4 and 3 bad readings, split by one valid reading: a fault at the 3rd reading of each
    assert faults == [
        (rows[start + 2]["t"], sensor, BadKind.NAN, 3),
        (rows[start + run + 3]["t"], sensor, BadKind.NAN, 3),
    ]
    assert p.counters.sensor_faults == 2 and p.counters.held == 7
    # HOLD after expiry: still identical to the batch path, which holds without limit
    p2 = Predictor(spec, infer, alarm=ALARM, policy=policy)
    assert predictions([e for r in rows for e in p2.push(r)]) == [(e.stream, e.t, e.rul) for e in p2.replay(bad_table)]


def test_hold_expired_drop_skips_rows_until_the_sensor_recovers(data) -> None:
    spec, clean, rows = _unit(data)
    infer = linear_model(spec)
    sensor, start = spec.sensor_names[0], WINDOW + 2
    for i in range(start, start + 5):
        rows[i][sensor] = "err"
    p = Predictor(spec, infer, alarm=ALARM, policy=BadRowPolicy(max_hold=2, on_hold_expired="drop"))
    events = [e for r in rows for e in p.push(r)]
    assert [e.t for e in events if isinstance(e, SensorFault)] == [rows[start + 2]["t"]]
    assert p.counters.dropped == 3 and p.counters.held == 2
    keep = np.ones(len(clean), bool)
    keep[start + 2 : start + 5] = False
    bad = clean
    for i in (start, start + 1):
        bad = _with_nan(bad, i, sensor)
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(bad.take(keep))]


# -- alarms -------------------------------------------------------------------------------


def _probe_spec(window: int = 1) -> WindowSpec:
    """One sensor 'rul' read as-is (mean 0, std 1, one condition, no settings)."""
    norm = Normalization(np.zeros((1, 0)), np.ones(0), np.zeros((1, 1)), np.ones((1, 1)))
    return WindowSpec(("rul",), (), norm, window=window, rul_cap=125.0)


def _run_alarm(seq: list[float], config: AlarmConfig) -> list:
    p = Predictor(_probe_spec(), lambda x: x[:, -1, 0], alarm=config)
    events = p.push_many({"stream": "press-1", "t": t, "rul": r} for t, r in enumerate(seq, start=1))
    return [(type(e).__name__, e.t, e.rul) for e in events if isinstance(e, (AlarmRaised, AlarmCleared))]


def test_alarm_hysteresis_and_debounce_on_a_scripted_sequence() -> None:
    seq = [100, 50, 20, 19, 25, 18, 17, 16, 30, 45, 50, 35, 41, 42, 43, 10, 10, 10]
    assert _run_alarm(seq, AlarmConfig(rul_low=20, rul_clear=40, debounce=3)) == [
        ("AlarmRaised", 8, 16.0),  # 20, 19 broken by 25; then 18, 17, 16
        ("AlarmCleared", 15, 43.0),  # 45, 50 broken by 35; then 41, 42, 43
        ("AlarmRaised", 18, 10.0),
    ]
    assert _run_alarm(seq, AlarmConfig(rul_low=20, rul_clear=40, debounce=1)) == [
        ("AlarmRaised", 3, 20.0),
        ("AlarmCleared", 10, 45.0),
        ("AlarmRaised", 16, 10.0),
    ]


def test_alarm_on_noisy_degradation_fires_once_and_clears_after_maintenance() -> None:
    # rul(t) = 125 − t ± 4 (alternating) until maintenance at t = 121, then 125 ± 4
    seq = [(125 - t if t < 121 else 125) + 4 * (-1) ** t for t in range(1, 141)]
    # ≤ 30: odd t ≥ 91 (121 − t), even t ≥ 99 (129 − t) → first 3 in a row: 99, 100, 101
    assert _run_alarm(seq, AlarmConfig(rul_low=30, rul_clear=40, debounce=3)) == [
        ("AlarmRaised", 101, 20.0),
        ("AlarmCleared", 123, 121.0),
    ]


def test_predictor_reports_active_alarms_and_health() -> None:
    p = Predictor(_probe_spec(), lambda x: x[:, -1, 0], alarm=AlarmConfig(rul_low=10, rul_clear=20, debounce=1))
    (pred, raised) = p.push(Row("m1", 1, {"rul": 5.0}))
    assert isinstance(raised, AlarmRaised) and p.active_alarms() == ("m1",)
    assert pred.health == 5.0 / 125.0
    assert p.push(Row("m2", 1, {"rul": 500.0}))[0].health == 1.0
    assert p.push(Row("m2", 2, {"rul": -3.0}))[0].health == 0.0
    assert p.active_alarms() == p.streams == ("m1", "m2") and p.counters.alarms_raised == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rul_low": 30, "rul_clear": 30, "debounce": 1},
        {"rul_low": 30, "rul_clear": 20, "debounce": 1},
        {"rul_low": 30, "rul_clear": 40, "debounce": 0},
        {"rul_low": 30, "rul_clear": 40, "debounce": 1.5},
        {"rul_low": math.nan, "rul_clear": 40, "debounce": 1},
        {"rul_low": 30, "rul_clear": 40, "debounce": 1, "schema_version": 2},
    ],
)
def test_alarm_config_is_validated(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AlarmConfig(**kwargs)


def test_policy_and_predictor_config_are_validated(data) -> None:
    spec, _, _ = _unit(data)
    with pytest.raises(ConfigError, match="extra"):
        BadRowPolicy(extra=Action.HOLD)
    with pytest.raises(ConfigError, match="duplicate"):
        BadRowPolicy(duplicate="hold")
    with pytest.raises(ConfigError, match="max_hold"):
        BadRowPolicy(max_hold=-1)
    with pytest.raises(ConfigError, match="unknown keys"):
        BadRowPolicy.from_dict({"nan": "drop", "nans": "drop"})
    assert BadRowPolicy.from_dict({"nan": "reject"}).nan is Action.REJECT
    with pytest.raises(ConfigError, match="unknown keys"):
        AlarmConfig.from_dict({"rul_low": 1, "rul_clear": 2, "debounce": 1, "hysteresis": 3})
    with pytest.raises(ConfigError, match="max_batch"):
        Predictor(spec, linear_model(spec), alarm=ALARM, max_batch=0)
    with pytest.raises(ConfigError, match="callable"):
        Predictor(spec, None, alarm=ALARM)  # type: ignore[arg-type]


def test_wrong_inference_output_is_a_backend_error(data) -> None:
    spec, _, rows = _unit(data)
    p = Predictor(spec, lambda x: np.zeros(len(x) + 1), alarm=ALARM)
    with pytest.raises(BackendError, match="one RUL per window"):
        p.push_many(rows[: WINDOW + 1])


# -- fuzz ---------------------------------------------------------------------------------

_FUZZ_SPEC = WindowSpec(
    ("a", "b", "c"),
    ("load", "speed"),
    Normalization(
        centers=[[60.0, 1200.0], [100.0, 1800.0]],
        scale=[20.0, 300.0],
        mean=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
        std=[[1.0, 0.5, 2.0], [3.0, 1.0, 0.25]],
    ),
    window=3,
)
_CHANNELS = ("a", "b", "c", "load", "speed")
_JUNK = [math.nan, math.inf, -math.inf, "abc", "", "1.5", "nan", "1e999", None, True, 10**400, [1.0], {"x": 1}]


def _fuzz_infer(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).sum(axis=1) * 3.0 + 40.0


_reading = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from(_JUNK),
    st.just("<missing>"),
)
_row = st.fixed_dictionaries(
    {"stream": st.sampled_from(["s1", "s2", 7, 7.5, None]), "t": st.one_of(st.integers(0, 12), st.just(math.nan))},
    optional={"a": _reading, "b": _reading, "c": _reading, "load": _reading, "speed": _reading},
).flatmap(
    lambda d: st.dictionaries(st.sampled_from(["x", "y", "a.extra", "t0"]), _reading, max_size=2).map(
        lambda extra: {**extra, **{k: v for k, v in d.items() if v != "<missing>"}}
    )
)
_policy = st.builds(
    BadRowPolicy,
    nan=st.sampled_from([Action.HOLD, Action.DROP, Action.REJECT]),
    inf=st.sampled_from([Action.HOLD, Action.DROP, Action.REJECT]),
    missing=st.sampled_from([Action.HOLD, Action.DROP, Action.REJECT]),
    non_numeric=st.sampled_from([Action.HOLD, Action.DROP, Action.REJECT]),
    extra=st.sampled_from([Action.IGNORE, Action.DROP, Action.REJECT]),
    out_of_order=st.sampled_from([Action.DROP, Action.REJECT]),
    duplicate=st.sampled_from([Action.DROP, Action.REJECT]),
    max_hold=st.integers(0, 3),
    on_hold_expired=st.sampled_from([Action.HOLD, Action.DROP]),
)
_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(rows=st.lists(_row, max_size=40), policy=_policy, max_batch=st.integers(1, 5), pad=st.booleans())
def test_fuzz_never_raises_push_many_equals_push_and_counters_add_up(rows, policy, max_batch, pad) -> None:
    warmup = Warmup.PAD if pad else Warmup.WAIT
    one = Predictor(_FUZZ_SPEC, _fuzz_infer, alarm=ALARM, policy=policy, warmup=warmup)
    pushed = [e for r in rows for e in one.push(r)]
    many = Predictor(_FUZZ_SPEC, _fuzz_infer, alarm=ALARM, policy=policy, warmup=warmup, max_batch=max_batch)
    assert without_latency(many.push_many(rows)) == without_latency(pushed)
    c = one.counters
    assert c == many.counters
    assert c.rows == len(rows) == c.accepted + c.dropped + c.rejected
    assert c.rejected == sum(isinstance(e, RowRejected) for e in pushed)
    assert c.predictions == sum(isinstance(e, Prediction) for e in pushed)
    assert c.sensor_faults == sum(isinstance(e, SensorFault) for e in pushed)
    assert c.alarms_raised == sum(isinstance(e, AlarmRaised) for e in pushed)
    assert c.alarms_cleared == sum(isinstance(e, AlarmCleared) for e in pushed)
    for e in pushed:
        json.dumps(e.to_dict(), allow_nan=False)
    assert all(math.isfinite(p.rul) for p in pushed if isinstance(p, Prediction))


def _expected_kind(v: object) -> BadKind | None:
    if v is None or isinstance(v, (bool, list, dict)) or v in ("abc", ""):
        return BadKind.NON_NUMERIC
    if isinstance(v, str):
        v = float(v)
    if isinstance(v, int):
        return BadKind.INF if abs(v) > 1e308 else None
    return BadKind.NAN if v != v else BadKind.INF if v in (math.inf, -math.inf) else None


@_FUZZ
@given(rows=st.lists(_row, max_size=40))
def test_fuzz_default_policy_counts_every_bad_reading(rows) -> None:
    """Default policy: values held, extras ignored, bad timestamps dropped; an oracle recounts."""
    p = Predictor(_FUZZ_SPEC, _fuzz_infer, alarm=ALARM)
    for r in rows:
        p.push(r)
    expected: dict[tuple[BadKind, str], int] = {}
    last: dict[str, int] = {}
    dropped = accepted = 0

    def add(kind: BadKind, name: str) -> None:
        expected[(kind, name)] = expected.get((kind, name), 0) + 1

    for r in rows:
        sid, t = r.get("stream"), r.get("t")
        if not isinstance(sid, (str, int)) or not isinstance(t, int):
            add(BadKind.MALFORMED, "")
            continue
        if str(sid) in last and t <= last[str(sid)]:
            add(BadKind.DUPLICATE if t == last[str(sid)] else BadKind.OUT_OF_ORDER, "")
            dropped += 1
            continue
        last[str(sid)] = t
        accepted += 1
        for name in _CHANNELS:
            kind = BadKind.MISSING if name not in r else _expected_kind(r[name])
            if kind is not None:
                add(kind, name)
        for k in r:
            if k not in (*_CHANNELS, "stream", "t"):
                add(BadKind.EXTRA, k)
    c = p.counters
    assert c.bad == expected
    assert (c.accepted, c.dropped) == (accepted, dropped)
    value_kinds = (BadKind.NAN, BadKind.INF, BadKind.MISSING, BadKind.NON_NUMERIC)
    assert c.held == sum(n for (k, _), n in expected.items() if k in value_kinds)


def test_condition_ties_and_missing_first_settings_match_the_batch_path() -> None:
    """Settings midway between two regimes (a tie) and a stream whose first row lacks its
    settings pick the same normalization condition as ``Normalization.condition``."""
    settings = np.array([[80.0, 1500.0], [math.nan, 1200.0], [80.0, 1500.0], [99.0, 1790.0], [80.0, 1500.0]])
    sensors = np.arange(15, dtype=np.float64).reshape(5, 3)
    table = SensorTable(
        np.array([1, 2, 2, 2, 2]), np.array([1, 1, 2, 3, 4]), settings, sensors, np.zeros(5), ("load", "speed"),
        ("a", "b", "c"),
    )  # fmt: skip
    rows = table_rows(table, _FUZZ_SPEC)
    del rows[1]["load"]  # missing → held, but there is nothing to hold yet: NaN, as in the table
    p = Predictor(_FUZZ_SPEC, _fuzz_infer, alarm=ALARM, warmup=Warmup.PAD)
    events = [e for r in rows for e in p.push(r)]
    assert predictions(events) == [(e.stream, e.t, e.rul) for e in p.replay(table)]
    assert len(predictions(events)) == 5
    json.dumps(p.counters.snapshot(), allow_nan=False)


# -- the edge never imports torch ---------------------------------------------------------


def test_importing_the_predictor_does_not_import_torch() -> None:
    code = (
        "import sys, edgeglm.runtime.predictor, edgeglm.runtime.alarms\n"
        "bad = sorted(m for m in ('torch', 'onnx', 'torch_geometric') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
