"""Edge agent → Mosquitto → cloud daemon under faults: nothing lost, nothing stored twice.

Every test counts what the edge produced (its outbox's seqs, its predictions) and what landed
in the cloud store, with a real Mosquitto (persistence on) and the real daemon and agent.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from brokers import Mosquitto

from edgeglm.data.factory import LineConfig, simulate_line
from edgeglm.runtime.agent import Agent
from edgeglm.runtime.agent_config import load_agent_config
from edgeglm.runtime.cloud.daemon import BrokerConfig, CloudConfig, CloudDaemon, StoreConfig
from edgeglm.runtime.outbox import Outbox

NODE = "press-07"
EDGEGLM = Path(sys.executable).with_name("edgeglm")


@pytest.fixture(scope="module")
def big_line(tmp_path_factory) -> Path:
    """≈ 12,000 rows of a simulated line (enough for > 10,000 one-prediction records)."""
    ds = simulate_line(LineConfig(units_train=4, units_test=70), seed=11)
    out = tmp_path_factory.mktemp("line")
    ds.test.to_text(out / "line.txt")
    cols = ["unit", "cycle", *ds.test.setting_names, *ds.test.sensor_names]
    (out / "columns.json").write_text(json.dumps({"columns": cols}))
    return out / "line.txt"


def _edge_toml(root: Path, line: Path, port: int, *, rate: float, **sync: object) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sync.items() if not k.startswith("outbox_"))
    outbox = "".join(f"{k[7:]} = {json.dumps(v)}\n" for k, v in sync.items() if k.startswith("outbox_"))
    return (
        f'[agent]\nnode = "{NODE}"\nroot = "{root}"\n[source]\nkind = "replay"\npath = "{line}"\nrate = {rate}\n'
        f"[sync]\nport = {port}\nrows_per_record = 1\nrecords_per_publish = 64\ninflight = 8\n"
        f"ack_timeout_s = 2.0\nreconnect_min_s = 0.5\nreconnect_max_s = 1.0\nhealth_interval_s = 1.0\n{extra}"
        f"[outbox]\n{outbox}"
    )


def _daemon(broker: Mosquitto, db: Path) -> CloudDaemon:
    d = CloudDaemon(
        CloudConfig(
            broker=BrokerConfig(
                host=broker.host, port=broker.port, protocol="3.1.1", reconnect_min_s=1, reconnect_max_s=2
            ),
            store=StoreConfig(path=db),
            client_id="cloud-1",
        )
    )
    d.start()
    assert d.wait_ready(15)
    return d


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _cloud_rows(db: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT seq, kind, body FROM records WHERE node = ? ORDER BY seq", (NODE,)).fetchall()


def _assert_nothing_lost(db: Path, outbox_path: Path) -> tuple[int, int]:
    """Every seq the edge produced is in the cloud exactly once (or covered by a gap); returns (records, rows)."""
    with Outbox(outbox_path, node=NODE) as ob:
        last, acked = ob.last_seq, ob.acked_seq
        stats = ob.stats()
    rows = _cloud_rows(db)
    seqs = [r[0] for r in rows]
    assert len(seqs) == len(set(seqs)), "a record was stored twice"
    gaps = [json.loads(b) for _, k, b in rows if k == "gap"]
    covered = set(seqs) | {s for g in gaps for a, b in g["ranges"] for s in range(a, b + 1)}
    assert covered == set(range(1, last + 1)), f"lost seqs: {sorted(set(range(1, last + 1)) - covered)[:20]}"
    assert acked == last and stats.records == 0
    return len(seqs), sum(len(json.loads(b)["rows"]) for _, k, b in rows if k == "predictions")


def test_broker_killed_twice_mid_stream_loses_nothing(device, big_line, tmp_path):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    daemon = _daemon(broker, tmp_path / "cloud.db")
    cfg = load_agent_config(text=_edge_toml(device, big_line, broker.port, rate=1500.0))
    agent = Agent(cfg)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stats", agent.run(drain=True, drain_timeout_s=90)))
    t.start()
    try:
        for at in (3000, 7000):  # kill -9 the broker when the edge has produced this many records
            _wait(lambda at=at: agent.outbox.last_seq >= at, 60, f"{at} records produced")
            os.kill(broker.proc.pid, signal.SIGKILL)
            broker.proc.wait()
            time.sleep(1.0)  # the edge keeps predicting and storing meanwhile
            broker.start()
        t.join(150)
        assert not t.is_alive()
    finally:
        agent.stop()
        t.join(10)
        daemon.stop()
        broker.stop()
    stats = result["stats"]
    records, rows = _assert_nothing_lost(tmp_path / "cloud.db", cfg.outbox_path)
    assert records == stats.produced >= 10_000
    assert rows == stats.predictions
    assert stats.connects >= 3


def test_agent_killed_mid_stream_and_restarted_loses_nothing(device, big_line, tmp_path, mosquitto):
    daemon = _daemon(mosquitto, tmp_path / "cloud.db")
    cfg_path = tmp_path / "edge.toml"
    cfg_path.write_text(_edge_toml(device, big_line, mosquitto.port, rate=4000.0))
    outbox_path = load_agent_config(cfg_path).outbox_path
    try:
        proc = subprocess.Popen(
            [str(EDGEGLM), "edge", "run", "--config", str(cfg_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(
            lambda: (
                outbox_path.exists() and len(_cloud_rows(tmp_path / "cloud.db")) > 1000
                if (tmp_path / "cloud.db").exists()
                else False
            ),
            60,
            "records in the cloud",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Outbox(outbox_path, node=NODE) as ob:
            killed_at = ob.last_seq
        # restart: the replay starts again from the top; rows it already saw are old for the predictor's
        # fresh state, so it predicts them again — new records with new seqs; nothing of before is lost
        done = subprocess.run(
            [str(EDGEGLM), "edge", "run", "--config", str(cfg_path), "--drain", "--drain-timeout", "60"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        final = json.loads(done.stderr.strip().splitlines()[-1])
    finally:
        daemon.stop()
    records, _ = _assert_nothing_lost(tmp_path / "cloud.db", outbox_path)
    assert records == final["last_seq"] > killed_at


def test_cloud_down_backlog_grows_then_drains(device, big_line, tmp_path, mosquitto):
    cfg = load_agent_config(text=_edge_toml(device, big_line, mosquitto.port, rate=3000.0))
    agent = Agent(cfg)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stats", agent.run(drain=True, drain_timeout_s=90)))
    t.start()  # no cloud daemon yet: the broker takes the messages, nobody acks
    try:
        _wait(lambda: agent.outbox.last_seq > 1000, 60, "a backlog of 1000 records")
        assert agent.outbox.acked_seq == 0  # nobody acknowledges: everything stays in the outbox
        daemon = _daemon(mosquitto, tmp_path / "cloud.db")
        t.join(150)
        assert not t.is_alive()
        daemon.stop()
    finally:
        agent.stop()
        t.join(10)
    records, rows = _assert_nothing_lost(tmp_path / "cloud.db", cfg.outbox_path)
    assert records == result["stats"].produced and rows == result["stats"].predictions


def test_outage_longer_than_the_bound_keeps_alarms_and_accounts_for_every_gap(device, big_line, tmp_path):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    broker.stop()  # the whole run happens with the broker down
    cfg = load_agent_config(text=_edge_toml(device, big_line, broker.port, rate=0.0, outbox_max_mb=0.25))
    agent = Agent(cfg)
    stats = agent.run()
    with Outbox(cfg.outbox_path, node=NODE) as ob:
        st = ob.stats()
        assert st.evicted_records > 0 and st.gaps_written > 0  # the bound was hit
    broker.start()
    daemon = _daemon(broker, tmp_path / "cloud.db")
    try:
        drain = Agent(
            load_agent_config(
                text=_edge_toml(device, big_line, broker.port, rate=0.0, outbox_max_mb=0.25).replace(
                    f'path = "{big_line}"', f'path = "{tmp_path / "empty.txt"}"'
                )
            )
        )
        (tmp_path / "empty.txt").write_text("")
        drain.run(drain=True, drain_timeout_s=60)
    finally:
        daemon.stop()
        broker.stop()
    rows = _cloud_rows(tmp_path / "cloud.db")
    alarms = [json.loads(b) for _, k, b in rows if k == "alarm"]
    assert len([a for a in alarms if a["event"] == "alarm_raised"]) == stats.alarms > 0  # every alarm arrived
    _assert_nothing_lost(tmp_path / "cloud.db", cfg.outbox_path)  # every missing seq is covered by a gap
    gaps = [json.loads(b) for _, k, b in rows if k == "gap"]
    stored_rows = sum(len(json.loads(b)["rows"]) for _, k, b in rows if k == "predictions")
    thinned = sum(json.loads(b).get("thinned", 0) for _, k, b in rows if k == "predictions")
    lost_rows = sum(g["rows"] for g in gaps)
    assert stored_rows + thinned + lost_rows == stats.predictions  # every prediction accounted for
