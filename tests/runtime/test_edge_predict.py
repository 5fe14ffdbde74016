"""`edgeglm edge predict`: sources (replay, stdin, MQTT), sinks (JSON lines, SQLite, CSV), metrics."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgeglm.cli import main
from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.data.table import SensorTable
from edgeglm.runtime.engine import Engine
from edgeglm.runtime.loop import make_predictor, run_rows
from edgeglm.runtime.metrics import MetricsServer, RuntimeMetrics
from edgeglm.runtime.sinks import JsonLinesSink
from edgeglm.runtime.sources import MqttSensorSource, replay_file, stdin_rows


@pytest.fixture(scope="module")
def bundle_file(runtime_fixtures):
    return runtime_fixtures.bundles["1"]


@pytest.fixture(scope="module")
def keys(runtime_fixtures):
    return runtime_fixtures.private_key, runtime_fixtures.public_key


@pytest.fixture(scope="module")
def line_files(tmp_path_factory):
    """The simulator's test split as `edgeglm simulate` writes it (text + columns.json) and as CSV."""
    ds = simulate_line(LineConfig(units_train=8, units_test=3), seed=5)
    out = tmp_path_factory.mktemp("line")
    ds.test.to_text(out / "test_factory.txt")
    columns = ["unit", "cycle", *ds.test.setting_names, *ds.test.sensor_names]
    (out / "columns.json").write_text(json.dumps({"columns": columns}))
    with open(out / "line.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stream", "t", *columns[2:]])
        for line in (out / "test_factory.txt").read_text().splitlines():
            w.writerow(line.split())
    return ds, out


def _predictions(stdout: str) -> list[dict]:
    return [d for d in map(json.loads, stdout.splitlines()) if d["event"] == "prediction"]


def test_replay_equals_the_batch_path(bundle_file, keys, line_files, capsys):
    ds, folder = line_files
    assert (
        main(
            [
                "edge",
                "predict",
                str(bundle_file),
                "--pubkey",
                str(keys[1]),
                "--replay",
                str(folder / "test_factory.txt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    preds = _predictions(out.out)
    # the reference: the batch path on the same numbers as written to the file (%.6g)
    cols = np.loadtxt(folder / "test_factory.txt")
    n_set = len(ds.test.setting_names)
    table = SensorTable(
        cols[:, 0].astype(np.int64),
        cols[:, 1].astype(np.int64),
        cols[:, 2 : 2 + n_set],
        cols[:, 2 + n_set :],
        np.zeros(len(cols)),
        ds.test.setting_names,
        ds.test.sensor_names,
    )
    with Engine.open(bundle_file, public_key=keys[1]) as eng:
        predictor = make_predictor(eng)
        batch = predictor.replay(table)
    assert len(preds) == len(batch) > 0
    np.testing.assert_allclose([p["rul"] for p in preds], [p.rul for p in batch], rtol=0, atol=1e-5)
    assert f"{len(ds.test)} rows, {len(batch)} predictions" in out.err


def test_csv_replay_sqlite_and_csv_sinks(bundle_file, keys, line_files, tmp_path, capsys):
    _, folder = line_files
    db, log = tmp_path / "events.db", tmp_path / "events.csv"
    assert (
        main(
            [
                "edge",
                "predict",
                str(bundle_file),
                "--pubkey",
                str(keys[1]),
                "--replay",
                str(folder / "line.csv"),
                "--sqlite",
                str(db),
                "--csv",
                str(log),
                "--units",
                "1,2",
            ]
        )
        == 0
    )
    preds = _predictions(capsys.readouterr().out)
    assert {p["stream"] for p in preds} == {"1", "2"}
    rows = sqlite3.connect(db).execute("SELECT stream, t, rul FROM events WHERE event='prediction' ORDER BY id")
    assert [(s, t, r) for s, t, r in rows] == [(p["stream"], p["t"], p["rul"]) for p in preds]
    with open(log) as f:
        logged = [r for r in csv.DictReader(f) if r["event"] == "prediction"]
    assert len(logged) == len(preds)


def test_stdin_with_bad_lines_never_crashes(bundle_file, keys, monkeypatch, capsys):
    with Engine.open(bundle_file, public_key=keys[1]) as eng:
        sensors = eng.manifest.window_spec["sensor_names"]
        settings = eng.manifest.window_spec["setting_names"]
    lines = []
    for t in range(1, 41):
        row = {"stream": "press-07", "t": t, **{s: 1.0 for s in settings}, **{s: 0.5 for s in sensors}}
        if t == 10:
            row[sensors[0]] = "NaN?"
        if t == 11:
            row[sensors[1]] = float("nan")
        lines.append(json.dumps(row))
    lines[20] = "{not json"
    lines.insert(25, json.dumps({"stream": "press-07", "t": 3}))  # out of order
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["edge", "predict", str(bundle_file), "--pubkey", str(keys[1]), "--stdin"]) == 0
    out = capsys.readouterr()
    events = [json.loads(x) for x in out.out.splitlines()]
    assert any(e["event"] == "row_rejected" for e in events)  # the line that was not JSON
    assert len(_predictions(out.out)) == 39 - 16 + 1  # window 16 over 39 accepted rows
    assert "41 rows" in out.err and "1 rejected" in out.err


def test_metrics_and_health_endpoints(bundle_file, keys, line_files):
    ds, folder = line_files
    with Engine.open(bundle_file, public_key=keys[1]) as eng:
        predictor = make_predictor(eng)
        metrics = RuntimeMetrics(predictor, model={"name": "m", "version": "1", "backend": eng.backend_name})
        server = MetricsServer(metrics)
        try:
            counters = run_rows(predictor, replay_file(folder / "test_factory.txt"), [], metrics=metrics, batch=64)
            body = urllib.request.urlopen(f"{server.url}/metrics", timeout=5).read().decode()
            health = json.loads(urllib.request.urlopen(f"{server.url}/healthz", timeout=5).read())
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"{server.url}/nope", timeout=5)
        finally:
            server.close()
    assert f"edgeglm_rows_total {float(counters.rows)}" in body
    assert f"edgeglm_predictions_total {float(counters.predictions)}" in body
    assert f"edgeglm_inference_latency_seconds_count {float(counters.predictions)}" in body
    assert 'edgeglm_model_info{backend="onnxruntime",name="m",version="1"} 1.0' in body
    nan_bad = sum(n for (k, _), n in counters.bad.items() if k.value == "nan")
    assert nan_bad > 0 and 'edgeglm_bad_readings_total{kind="nan"' in body
    assert health["status"] == "ok" and health["rows"] == counters.rows == len(ds.test)


def test_mqtt_sensor_topic_json_and_cbor(bundle_file, keys, line_files, mosquitto):
    import cbor2
    import paho.mqtt.client as mqtt

    _, folder = line_files
    rows = [r for r in replay_file(folder / "test_factory.txt") if r["stream"] == 1][:40]
    src = MqttSensorSource(mosquitto.host, mosquitto.port, "factory/line1/+/sensors", stream_level=2)
    assert src.connected.wait(10)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc-gateway")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    for i, r in enumerate(rows):
        r = {k: v for k, v in r.items() if k != "stream"}  # the stream id comes from the topic
        payload = json.dumps(r).encode() if i % 2 else cbor2.dumps(r)
        pub.publish("factory/line1/press-07/sensors", payload, qos=1).wait_for_publish(5)
    pub.publish("factory/line1/press-07/sensors", b"\xff\x00garbage", qos=1).wait_for_publish(5)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < len(rows) + 1 and time.monotonic() < deadline:
        row = src.get(timeout=0.5)
        if row is not None:
            got.append(row)
    src.close()
    pub.loop_stop()
    assert len(got) == len(rows) + 1 and src.decode_errors == 1
    with Engine.open(bundle_file, public_key=keys[1]) as eng:
        live = make_predictor(eng)
        sink = JsonLinesSink(io.StringIO())
        run_rows(live, got, [sink])
        ref = make_predictor(eng)
        run_rows(ref, [{**r, "stream": "press-07"} for r in rows], [])
    assert live.counters.predictions == ref.counters.predictions == len(rows) - 16 + 1
    assert live.counters.rejected == 1  # the garbage payload, rejected as malformed


def test_stdin_rows_accepts_lists_and_aliases():
    rows = list(stdin_rows(io.StringIO('[{"unit": 3, "cycle": 1, "s1": 2}]\n\n{"machine": "m", "time": 2}\n')))
    assert rows == [{"stream": 3, "t": 1, "s1": 2}, {"stream": "m", "t": 2}]


def test_replay_keeps_only_the_model_columns_so_unused_ones_are_not_bad_rows(tmp_path):
    path = tmp_path / "train_FD001.txt"
    path.write_text("1 1 0.1 0.2 100 " + " ".join(str(i) for i in range(1, 22)) + "\n")
    (row,) = replay_file(path, keep={"s2", "setting1"})
    assert row == {"stream": 1, "t": 1, "setting1": 0.1, "s2": 2}
    (full,) = replay_file(path)
    assert len(full) == 26 and full["s21"] == 21
