"""The cloud side: the idempotent store and its high-water mark, the sync daemon against a real
Mosquitto (acks, retransmissions, garbage, shared subscriptions, persistent sessions), the generated
broker config enforcing per-node ACLs, and the ``cloud``/``broker`` commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from brokers import Mosquitto, free_port

from edgeglm.cli import main
from edgeglm.errors import ConfigError, DataError, ProtocolError
from edgeglm.protocol import MAX_PAYLOAD_BYTES, Ack, Envelope, Kind, Record, Topics
from edgeglm.runtime import cloud
from edgeglm.runtime.cloud import (
    BrokerConfig,
    CloudConfig,
    CloudDaemon,
    MqttProtocol,
    NodeStatus,
    SqliteStore,
    StoreConfig,
    load_cloud_config,
    load_fleet,
    write_broker_config,
)

mqtt = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

A, B = "press-07", "press-08"
INC = 0x1234_5678_9ABC


def env(node: str, seqs, *, inc: int = INC, kind: Kind = Kind.PREDICTIONS, body=None, boot: int = 1) -> Envelope:
    return Envelope(node, inc, boot, tuple(Record(s, kind, 1000.0 + s, dict(body or {"rul": 50.0})) for s in seqs))


def gap(node: str, seq: int, ranges, *, inc: int = INC) -> Envelope:
    n = sum(b - a + 1 for a, b in ranges)
    return Envelope(node, inc, 1, (Record(seq, Kind.GAP, 2000.0, {"ranges": ranges, "count": n, "reason": "full"}),))


def wait_until(pred: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "cloud.db")
    yield s
    s.close()


def test_put_is_idempotent_and_counts_duplicates(store: SqliteStore) -> None:
    r = store.put_envelope(env(A, [1, 2, 3]), received_at=10.0)
    assert (r.new, r.duplicate, r.covered_hwm) == (3, 0, 3)
    r = store.put_envelope(env(A, [2, 3, 4]), received_at=11.0)  # a retransmission overlapping new data
    assert (r.new, r.duplicate, r.covered_hwm) == (1, 2, 4)
    r = store.put_envelope(env(A, [1, 2, 3, 4]), received_at=12.0)
    assert (r.new, r.duplicate, r.covered_hwm) == (0, 4, 4)
    assert [x.seq for x in store.records(A)] == [1, 2, 3, 4]
    assert store.records(A)[0].msg_id == f"{INC:016x}-1"
    c = store.counts()
    assert (c.records, c.duplicates, c.nodes) == (4, 6, 1)
    (n,) = store.nodes()
    assert (n.records, n.duplicates, n.hwm, n.inc, n.last_seen, n.first_seen) == (4, 6, 4, INC, 12.0, 10.0)


def test_high_water_mark_stops_at_the_first_hole(store: SqliteStore) -> None:
    assert store.high_water(A, INC) == 0
    assert store.put_envelope(env(A, [2, 3]), 1.0).covered_hwm == 0  # seq 1 still travelling
    assert store.put_envelope(env(A, [1, 5]), 2.0).covered_hwm == 3
    assert store.coverage(A, INC) == [(1, 3), (5, 5)]
    assert store.put_envelope(env(A, [4]), 3.0).covered_hwm == 5
    assert store.coverage(A, INC) == [(1, 5)]  # merged back into one interval
    assert store.high_water(A, INC) == 5


def test_gap_ranges_cover_dropped_seqs(store: SqliteStore) -> None:
    store.put_envelope(env(A, [1, 2]), 1.0)
    r = store.put_envelope(gap(A, 10, [[3, 5], [7, 9]]), 2.0)  # the outbox evicted 3..5 and 7..9
    assert r.covered_hwm == 5
    assert store.coverage(A, INC) == [(1, 5), (7, 10)]
    assert store.put_envelope(env(A, [6]), 3.0).covered_hwm == 10
    assert store.counts().by_kind == {"predictions": 3, "gap": 1}  # a gap covers seqs, it stores no records


@pytest.mark.parametrize(
    "ranges",
    [[[3, 10]], [[0, 2]], [[5, 3]], [], [[1]], [["1", 2]], "3-5", [[True, 2]]],
    ids=["reaches-own-seq", "zero", "reversed", "empty", "short", "text", "string", "bool"],
)
def test_bad_gap_ranges_are_refused_and_nothing_is_stored(store: SqliteStore, ranges) -> None:
    bad = Envelope(A, INC, 1, (Record(1, Kind.PREDICTIONS, 1.0, {}), Record(10, Kind.GAP, 2.0, {"ranges": ranges})))
    with pytest.raises(ProtocolError, match="gap record seq 10"):
        store.put_envelope(bad, 1.0)
    assert store.counts().records == 0 and store.coverage(A, INC) == [] and store.nodes() == []


def test_bodies_must_be_json_representable(store: SqliteStore) -> None:
    with pytest.raises(ProtocolError, match="bytes"):
        store.put_envelope(env(A, [1], body={"raw": b"\x00\x01"}), 1.0)
    store.put_envelope(env(A, [1], body={"rul": float("nan"), "xs": [1.0, float("inf")]}), 1.0)
    assert store.records(A)[0].body == {"rul": None, "xs": [1.0, None]}  # non-finite numbers become null
    with pytest.raises(ProtocolError, match="finite"):
        store.put_envelope(Envelope(A, INC, 1, (Record(2, Kind.HEALTH, float("nan"), {}),)), 1.0)
    assert store.high_water(A, INC) == 1


def test_coverage_and_counts_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "cloud.db"
    with SqliteStore(path) as s:
        s.put_envelope(env(A, [1, 2, 4]), 1.0)
        s.put_envelope(gap(A, 8, [[6, 7]]), 2.0)
    with SqliteStore(path) as s:
        assert s.coverage(A, INC) == [(1, 2), (4, 4), (6, 8)]
        assert s.put_envelope(env(A, [3, 4]), 3.0) == cloud.PutResult(1, 1, 4)
        assert s.put_envelope(env(A, [5]), 4.0).covered_hwm == 8
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_incarnations_have_their_own_high_water_marks(store: SqliteStore) -> None:
    store.put_envelope(env(A, [1, 2, 3]), 1.0)
    r = store.put_envelope(env(A, [1], inc=99, boot=1), 2.0)  # the outbox was wiped: a new incarnation
    assert r == cloud.PutResult(1, 0, 1)
    assert store.high_water(A, INC) == 3 and store.high_water(A, 99) == 1
    (n,) = store.nodes()
    assert (n.inc, n.hwm, n.records) == (99, 1, 4)


def test_fleet_view_tracks_model_backlog_status_and_alarms(store: SqliteStore) -> None:
    health = {"model": "fd001:1.2.0", "backlog": 17}
    store.put_envelope(env(A, [1], kind=Kind.HEALTH, body=health), 1.0)
    store.put_envelope(env(A, [2], body={"model": "fd001:1.3.0", "rul": 80.0}), 2.0)
    store.put_envelope(env(A, [3], kind=Kind.HEALTH, body={"backlog": 2}), 3.0)
    raised = {"event": "alarm_raised", "stream": "unit-1", "t": 1.0, "rul": 12.5}
    store.put_envelope(env(A, [4], kind=Kind.ALARM, body=raised), 4.0)
    store.put_envelope(env(A, [5], kind=Kind.ALARM, body={**raised, "stream": "unit-2"}), 5.0)
    store.put_envelope(env(A, [6], kind=Kind.ALARM, body={**raised, "event": "alarm_cleared", "stream": "unit-2"}), 6)
    store.set_node_status(A, NodeStatus.ONLINE, 7.0)
    store.set_node_status(A, NodeStatus.OFFLINE, 6.5)  # older than what is stored: ignored
    store.set_node_status(B, NodeStatus.OFFLINE, 8.0)  # a status before any telemetry
    a, b = store.nodes()
    assert (a.node, a.model, a.backlog, a.status, a.status_t, a.active_alarms) == (
        A,
        "fd001:1.3.0",
        2,
        NodeStatus.ONLINE,
        7.0,
        1,
    )
    assert (b.node, b.status, b.records, b.last_seen, b.hwm) == (B, NodeStatus.OFFLINE, 0, None, 0)
    history = store.alarms()
    assert [(x.stream, x.event, x.active) for x in history] == [
        ("unit-2", "alarm_cleared", False),
        ("unit-2", "alarm_raised", False),
        ("unit-1", "alarm_raised", True),
    ]
    (active,) = store.alarms(active_only=True)
    assert (active.node, active.stream, active.rul) == (A, "unit-1", 12.5)
    assert store.alarms(node=B) == []
    assert store.counts().active_alarms == 1


def test_schema_version_of_another_edgeglm_is_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "c.db").close()
    with sqlite3.connect(tmp_path / "c.db") as db:
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(DataError, match="schema version 2"):
        SqliteStore(tmp_path / "c.db")
    with pytest.raises(DataError, match="no cloud store"):
        SqliteStore(tmp_path / "missing.db", create=False)


# ---------------------------------------------------------------------------------------------
# daemon against a real Mosquitto
# ---------------------------------------------------------------------------------------------


class Client:
    """A test MQTT client: an edge node publishing envelopes and collecting its acks, or a spy."""

    def __init__(self, broker: Mosquitto, *, user: str | None = None, password: str | None = None, v5: bool = True):
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, object] = {}
        self.subacks: dict[int, list] = {}
        self.connack: object = None
        self._connected = threading.Event()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{user}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        if user is not None:
            c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_message = lambda cl, ud, m: self.messages.append((m.topic, m.payload))
        c.on_publish = lambda cl, ud, mid, rc, props: self.pubacks.__setitem__(mid, rc)
        c.on_subscribe = lambda cl, ud, mid, rcs, props: self.subacks.__setitem__(mid, rcs)
        c.reconnect_delay_set(1, 1)
        self.c = c
        c.connect(broker.host, broker.port, keepalive=30)
        c.loop_start()
        self._connected.wait(10)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code
        self._connected.set()

    @property
    def ok(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str) -> list:
        _, mid = self.c.subscribe(topic, 1)
        wait_until(lambda: mid in self.subacks, 5, f"SUBACK of {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | Envelope, *, retain: bool = False) -> object:
        data = payload.to_bytes() if isinstance(payload, Envelope) else payload
        info = self.c.publish(topic, data, qos=1, retain=retain)
        wait_until(lambda: info.mid in self.pubacks, 5, f"PUBACK on {topic}")
        return self.pubacks[info.mid]

    def acks(self, node: str) -> list[Ack]:
        return [Ack.from_bytes(p) for t, p in list(self.messages) if t == Topics(node).ack]

    def wait_ack(self, node: str, seq: int, timeout_s: float = 10.0) -> None:
        wait_until(lambda: any(a.seq == seq for a in self.acks(node)), timeout_s, f"ack {seq} for {node}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def daemon_config(broker: Mosquitto, db: Path, **kw) -> CloudConfig:
    broker_kw = {k: kw.pop(k) for k in ("protocol", "username", "password") if k in kw}
    return CloudConfig(
        broker=BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=1, reconnect_max_s=2, **broker_kw),
        store=StoreConfig(path=db),
        client_id=kw.pop("client_id", f"cloud-{uuid.uuid4().hex[:6]}"),
        **kw,
    )


@pytest.fixture
def running(mosquitto: Mosquitto, tmp_path: Path):
    """Start daemons on the test broker; all are stopped at teardown."""
    started: list[CloudDaemon] = []

    def start(**kw) -> CloudDaemon:
        d = CloudDaemon(daemon_config(mosquitto, kw.pop("db", tmp_path / "cloud.db"), **kw))
        d.start()
        assert d.wait_ready(10), "the daemon did not connect and subscribe"
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def node(mosquitto: Mosquitto):
    clients: list[Client] = []

    def make(**kw) -> Client:
        c = Client(mosquitto, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_records_land_once_and_the_ack_carries_the_high_water_mark(running, node, tmp_path, protocol) -> None:
    daemon = running(protocol=protocol)
    edge = node(v5=protocol == "5")
    edge.subscribe(Topics(A).ack)
    edge.publish(Topics(A).telemetry, env(A, [1, 2, 3]))
    edge.wait_ack(A, 3)
    edge.publish(Topics(A).telemetry, env(A, [1, 2, 3]))  # the ack was "lost": the edge retransmits
    wait_until(lambda: len(edge.acks(A)) == 2, what="the second ack")
    edge.publish(Topics(A).alarm, env(A, [5], kind=Kind.ALARM, body={"event": "alarm_raised", "stream": "u1"}))
    wait_until(lambda: len(edge.acks(A)) == 3, what="the third ack")
    edge.publish(Topics(A).telemetry, env(A, [4]))
    edge.wait_ack(A, 5)
    assert [a.seq for a in edge.acks(A)] == [3, 3, 3, 5]  # seq 4 was missing until the last message
    assert {(a.node, a.inc) for a in edge.acks(A)} == {(A, INC)}
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert [r.seq for r in s.records(A)] == [1, 2, 3, 5, 4]  # arrival order, each once
        assert s.counts().records == 5 and s.alarms(active_only=True)[0].stream == "u1"
    c = daemon.counters
    assert (c.received, c.envelopes, c.stored, c.duplicates, c.acks_sent, c.garbage_total) == (4, 4, 5, 3, 4, 0)


def test_garbage_is_counted_by_reason_and_nothing_wrong_is_stored(running, node, tmp_path) -> None:
    daemon = running()
    edge = node()
    edge.subscribe(Topics(A).ack)
    good = env(A, [1]).to_bytes()
    doc = {"v": 1, "node": A, "inc": INC, "boot": 1, "records": [{"seq": 1, "kind": "predictions", "t": 1.0}]}
    bad_gap = Envelope(A, INC, 1, (Record(2, Kind.GAP, 1.0, {"ranges": [[1, 5]]}),))
    garbage = {
        "undecodable": [b"\x1c\x1d\x1e", good[:-7], b""],  # reserved CBOR bytes, truncated CBOR, empty
        "schema": [b'{"hello": "world"}', cbor2.dumps([1, 2, 3]), cbor2.dumps({**doc, "records": []})],
        "oversized": [b"\x00" * (MAX_PAYLOAD_BYTES + 1)],
        "version": [cbor2.dumps({**doc, "v": 2})],
        "node_mismatch": [env(B, [1]).to_bytes()],  # node B's envelope on node A's topic
        "record": [bad_gap.to_bytes()],
    }
    for payloads in garbage.values():
        for p in payloads:
            edge.publish(Topics(A).telemetry, p)
    edge.publish("edgeglm/v2/press-07/telemetry", good)  # not subscribed: never reaches the daemon
    edge.publish(Topics(A).status, b"rebooting")
    n = sum(map(len, garbage.values())) + 1
    wait_until(lambda: daemon.counters.garbage_total == n, what=f"{n} garbage messages counted")
    expected = {k: len(v) for k, v in garbage.items()} | {"status": 1}
    assert daemon.counters.garbage == expected
    assert edge.acks(A) == []  # garbage is never acknowledged
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert s.counts().records == 0 and s.nodes() == []
    edge.publish(Topics(A).telemetry, good)  # the daemon is alive and well
    edge.wait_ack(A, 1)
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert [(r.node, r.seq) for r in s.records(A)] == [(A, 1)] and s.records(B) == []
    assert daemon.counters.internal_errors == 0 and daemon.counters.store_errors == 0


def test_status_topic_updates_the_fleet_view(running, node, tmp_path) -> None:
    daemon = running()
    edge = node()
    edge.publish(Topics(A).status, json.dumps({"state": "online", "node": A, "model": "m:1"}).encode(), retain=True)
    edge.publish(Topics(B).status, json.dumps({"state": "stopped", "node": B}).encode(), retain=True)
    edge.publish("edgeglm/v1/press-09/status", b"offline", retain=True)
    edge.publish("edgeglm/v1/press-10/status", json.dumps({"state": "online", "node": A}).encode())  # as another
    edge.publish("edgeglm/v1/press-11/status", b"", retain=True)  # clearing a retained status: nothing to do
    wait_until(lambda: daemon.counters.received == 5, what="five status messages")
    assert daemon.counters.status_updates == 3 and daemon.counters.garbage == {"status": 1}
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert [(n.node, n.status) for n in s.nodes()] == [
            (A, NodeStatus.ONLINE),
            (B, NodeStatus.STOPPED),
            ("press-09", NodeStatus.OFFLINE),
        ]


def test_two_daemons_of_one_share_group_split_the_load_and_store_each_record_once(running, node, tmp_path) -> None:
    d1 = running(client_id="cloud-1")
    d2 = running(client_id="cloud-2")
    edge = node()
    edge.subscribe(Topics(A).ack)
    n = 40
    for seq in range(1, n + 1):
        edge.c.publish(Topics(A).telemetry, env(A, [seq]).to_bytes(), qos=1)
    wait_until(lambda: d1.counters.stored + d2.counters.stored == n, 20, f"{n} records stored")
    assert d1.counters.stored > 0 and d2.counters.stored > 0, "the broker did not split the messages"
    assert d1.counters.duplicates + d2.counters.duplicates == 0
    edge.wait_ack(A, n)  # whichever daemon commits last sees every record of both
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert sorted(r.seq for r in s.records(A)) == list(range(1, n + 1))
        assert s.high_water(A, INC) == n


def test_a_stopped_daemon_gets_what_arrived_meanwhile_from_its_persistent_session(running, node, tmp_path) -> None:
    first = running(client_id="cloud-p", protocol="5")
    edge = node()
    edge.subscribe(Topics(A).ack)
    edge.publish(Topics(A).telemetry, env(A, [1]))
    edge.wait_ack(A, 1)
    first.stop()
    edge.publish(Topics(A).telemetry, env(A, [2, 3]))  # nobody of the group is connected
    second = running(client_id="cloud-p", protocol="5")  # same session
    edge.wait_ack(A, 3)
    assert second.counters.stored == 2


def test_the_daemon_reconnects_after_a_broker_restart(mosquitto: Mosquitto, running, node) -> None:
    daemon = running(protocol="3.1.1")
    mosquitto.stop()
    mosquitto.start()
    wait_until(lambda: daemon.wait_ready(0), 15, "the daemon to reconnect and resubscribe")
    edge = node()
    edge.subscribe(Topics(A).ack)
    edge.publish(Topics(A).telemetry, env(A, [1]))
    edge.wait_ack(A, 1)


# ---------------------------------------------------------------------------------------------
# the generated broker config: per-node credentials and ACL
# ---------------------------------------------------------------------------------------------


def write_fleet(path: Path, port: int, *, extra_nodes=()) -> Path:
    nodes = "".join(f'[[node]]\nname = "{n}"\n' for n in (A, B, *extra_nodes))
    path.write_text(
        f'schema_version = 1\n[broker]\nuser = "root"\n[[listener]]\nport = {port}\nbind = "127.0.0.1"\n'
        f'[cloud]\nusername = "edgeglm-cloud"\n{nodes}'
    )
    return path


def credentials(path: Path) -> dict[str, str]:
    """Password by user name, and the cloud's share group under ``"share_group"``."""
    import tomllib

    doc = tomllib.loads(path.read_text())
    return {e["name"]: e["password"] for e in [doc["cloud"], *doc["node"]]} | {
        "share_group": doc["cloud"]["share_group"]
    }


def test_broker_config_files_and_password_reuse(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path / "fleet.toml", 18830)
    files = write_broker_config(load_fleet(fleet), tmp_path / "broker")
    conf = files.conf.read_text()
    for line in ("allow_anonymous false", "persistence true", "listener 18830 127.0.0.1", f"acl_file {files.acl}"):
        assert line in conf
    acl = files.acl.read_text()
    assert "user edgeglm-cloud\ntopic readwrite edgeglm/v1/#" in acl
    assert "pattern readwrite edgeglm/v1/%u/#" in acl
    pw_lines = files.passwords.read_text().splitlines()
    assert [x.split(":")[0] for x in pw_lines] == ["edgeglm-cloud", A, B]
    assert all(x.split(":", 1)[1].startswith("$7$101$") for x in pw_lines)
    assert files.credentials.stat().st_mode & 0o777 == 0o600
    assert files.passwords.stat().st_mode & 0o077 == 0
    assert files.generated == ("edgeglm-cloud", A, B)
    assert files.share_group.startswith("edgeglm-cloud-") and len(files.share_group) == len("edgeglm-cloud-") + 16
    before = credentials(files.credentials)
    assert before["share_group"] == files.share_group
    again = write_broker_config(load_fleet(write_fleet(fleet, 18830, extra_nodes=["press-09"])), tmp_path / "broker")
    assert again.generated == ("press-09",)  # adding a node keeps everyone else's password and the group
    after = credentials(again.credentials)
    assert {k: after[k] for k in before} == before and len(after["press-09"]) >= 24


def test_own_password_hash_matches_mosquitto_passwd_format() -> None:
    import base64
    import hashlib

    h = cloud.hash_password("secret", salt=b"0123456789ab")
    _, seven, iterations, salt, key = h.split("$")
    assert (seven, iterations, base64.b64decode(salt)) == ("7", "101", b"0123456789ab")
    assert base64.b64decode(key) == hashlib.pbkdf2_hmac("sha512", b"secret", b"0123456789ab", 101)


@pytest.mark.parametrize(
    "fleet_text, match",
    [
        ('[[node]]\nname = "a/b"\n', "invalid node name"),
        ('[[node]]\nname = "x"\n[[node]]\nname = "x"\n', "listed twice"),
        ('[[node]]\nname = "edgeglm-cloud"\n', "cloud user"),
        ('[[node]]\nname = "x"\nrole = "admin"\n', "unknown key node.role"),
        ("", "no \\[\\[node\\]\\]"),
        ('[[listener]]\nport = 70000\n[[node]]\nname = "x"\n', "listener.port"),
    ],
)
def test_fleet_file_errors_name_the_problem(tmp_path: Path, fleet_text: str, match: str) -> None:
    (tmp_path / "fleet.toml").write_text(fleet_text)
    with pytest.raises(ConfigError, match=match):
        load_fleet(tmp_path / "fleet.toml")


class GeneratedBroker(Mosquitto):
    """Mosquitto run from the config ``edgeglm broker config`` wrote (not the fixture's own)."""

    def __init__(self, exe: str, conf: Path, port: int) -> None:  # start() and stop() are Mosquitto's
        self.exe, self.dir, self.port, self.host, self.conf, self.proc = exe, conf.parent, port, "127.0.0.1", conf, None
        self.start()


@pytest.fixture
def fleet_broker(tmp_path: Path, request):
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if exe is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    passwd_tool = getattr(request, "param", "auto")
    files = write_broker_config(
        load_fleet(write_fleet(tmp_path / "fleet.toml", port)), tmp_path / "broker", passwd_tool=passwd_tool
    )
    with files.conf.open("a") as f:
        f.write(f"log_dest file {tmp_path / 'broker' / 'mosquitto.log'}\nlog_type all\n")
    broker = GeneratedBroker(exe, files.conf, port)
    yield broker, credentials(files.credentials), files
    broker.stop()


@pytest.mark.parametrize("fleet_broker, v5", [("auto", True), (None, False)], indirect=["fleet_broker"],
                         ids=["mosquitto_passwd-mqtt5", "python-hash-mqtt311"])  # fmt: skip
def test_generated_acl_confines_each_node_to_its_own_topics(fleet_broker, tmp_path: Path, v5: bool) -> None:
    broker, creds, files = fleet_broker
    clients: list[Client] = []

    def client(user: str | None, password: str | None = None, **kw) -> Client:
        c = Client(broker, user=user, password=password, **kw)
        clients.append(c)
        return c

    config = daemon_config(
        broker,
        tmp_path / "cloud.db",
        username="edgeglm-cloud",
        password=creds["edgeglm-cloud"],
        share_group=creds["share_group"],
    )
    daemon = CloudDaemon(config)
    daemon.start()
    try:
        assert daemon.wait_ready(10), "the cloud user could not connect or subscribe"
        assert not client(None).ok, "anonymous access must be refused"
        assert not client(A, "wrong password").ok
        a, b = client(A, creds[A], v5=v5), client(B, creds[B])
        assert a.ok and b.ok
        a.subscribe(Topics(A).ack)
        a.subscribe(Topics(B).ack)  # Mosquitto may grant it, but never delivers B's messages to A
        a.subscribe("edgeglm/v1/+/telemetry")  # matches B's telemetry too, but the read check filters it
        # Joining the cloud's share group would hand A turns of B's messages (then dropped by the read
        # check): the generated group is secret, so the well-known default name shares with nobody.
        a.subscribe("$share/edgeglm-cloud/edgeglm/v1/+/telemetry")
        b.subscribe(Topics(B).ack)

        assert not a.publish(Topics(A).telemetry, env(A, [1])).is_failure
        a.wait_ack(A, 1)  # A may use its own topics
        forged = a.publish(Topics(B).telemetry, env(B, [1, 2, 3]))
        if v5:
            assert forged.is_failure and forged == "Not authorized"
        a.publish(Topics(B).status, b"offline", retain=True)
        for seq in range(1, 9):
            b.publish(Topics(B).telemetry, env(B, [seq], body={"by": "B"}))
        b.wait_ack(B, 8)  # every one of B's own records, none lost to A; the forged 1..3 never reached the cloud
        time.sleep(0.3)
        assert a.acks(B) == [], "A read B's ack"
        assert [t for t, _ in a.messages if t == Topics(B).telemetry] == [], "A read B's telemetry"
        assert {t for t, _ in a.messages} == {Topics(A).ack, Topics(A).telemetry}  # its own, nothing of B
        with SqliteStore(tmp_path / "cloud.db", create=False) as s:
            assert [(r.seq, r.body) for r in s.records(B)] == [(i, {"by": "B"}) for i in range(1, 9)]
            assert {n.node: n.status for n in s.nodes()} == {A: NodeStatus.UNKNOWN, B: NodeStatus.UNKNOWN}
        assert daemon.counters.garbage_total == 0  # the broker dropped the forgeries, the daemon saw none
        log = (files.conf.parent / "mosquitto.log").read_text()
        assert f"Denied PUBLISH from {a.c._client_id.decode()}" in log
    finally:
        daemon.stop()
        for c in clients:
            c.close()


# ---------------------------------------------------------------------------------------------
# config and CLI
# ---------------------------------------------------------------------------------------------


def test_cloud_config_loads_relative_paths_and_password_file(tmp_path: Path) -> None:
    (tmp_path / "cloud.password").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "cloud.toml").write_text(
        'schema_version = 1\nclient_id = "c1"\nshare_group = "g1"\n'
        '[broker]\nhost = "mq.example"\nport = 8883\nprotocol = "3.1.1"\nusername = "edgeglm-cloud"\n'
        'password_file = "cloud.password"\n[broker.tls]\nca = "ca.pem"\n[store]\npath = "data/cloud.db"\n'
    )
    c = load_cloud_config(tmp_path / "cloud.toml")
    assert (c.client_id, c.share_group, c.broker.host, c.broker.port) == ("c1", "g1", "mq.example", 8883)
    assert c.broker.protocol is MqttProtocol.V311 and c.broker.password == "s3cret"
    assert c.broker.tls is not None and c.broker.tls.ca == tmp_path / "ca.pem"
    assert c.store.path == tmp_path / "data" / "cloud.db"
    assert "s3cret" not in repr(c)
    assert cloud.cloud_subscriptions("g1")[:2] == ["$share/g1/edgeglm/v1/+/telemetry", "$share/g1/edgeglm/v1/+/alarm"]
    assert cloud.cloud_subscriptions("") == [f"edgeglm/v1/+/{x}" for x in ("telemetry", "alarm", "status")]


@pytest.mark.parametrize(
    "text, key",
    [
        ("[broker]\nhots = 'x'\n", "broker.hots"),
        ("[broker]\nport = 0\n", "broker.port"),
        ("[broker]\nprotocol = '4'\n", "broker.protocol"),
        ("[broker]\npassword = 'x'\n", "broker.password"),
        ("[broker.tls]\ncert = 'c.pem'\n", "broker.tls"),
        ("share_group = 'a/b'\n", "share_group"),
        ("client_id = ''\n", "client_id"),
        ("schema_version = 2\n", "schema_version"),
        ("[store]\npath = 'a.db'\ndsn = 'postgresql://x/y'\n", "store"),
        ("[store]\ndsn = 'mysql://x'\n", "store.dsn"),
        ("colour = 'blue'\n", "colour"),
    ],
)
def test_cloud_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    (tmp_path / "cloud.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cloud_config(tmp_path / "cloud.toml")
    assert key in err.value.message


def test_postgres_dsn_is_designed_but_not_shipped(tmp_path: Path) -> None:
    (tmp_path / "cloud.toml").write_text("[store]\ndsn = 'postgresql://cloud@db/edgeglm'\n")
    with pytest.raises(ConfigError, match="PostgreSQL"):
        cloud.open_store(load_cloud_config(tmp_path / "cloud.toml").store)


def test_cli_nodes_and_alarms(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "cloud.db"
    now = time.time()
    with SqliteStore(db) as s:
        s.put_envelope(env(A, [1], kind=Kind.HEALTH, body={"model": "fd001:1.2.0", "backlog": 3}), now - 5)
        s.put_envelope(env(A, [2], kind=Kind.ALARM, body={"event": "alarm_raised", "stream": "u7", "rul": 9.0}), now)
        s.set_node_status(A, NodeStatus.ONLINE, now)
    assert main(["cloud", "nodes", "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "NODE", "STATUS", "LAST", "SEEN", "MODEL", "BACKLOG", "ACKED", "RECORDS", "DUPLICATES", "ALARMS",
    ]  # fmt: skip
    assert out.splitlines()[1].split() == [A, "online", "0", "s", "ago", "fd001:1.2.0", "3", "2", "2", "0", "1"]
    assert main(["cloud", "nodes", "--store", str(db), "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["node"], doc["hwm"], doc["model"], doc["active_alarms"]) == (A, 2, "fd001:1.2.0", 1)
    (tmp_path / "cloud.toml").write_text(f"[store]\npath = '{db}'\n")
    assert main(["cloud", "alarms", "--config", str(tmp_path / "cloud.toml"), "--active"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["TIME", "(UTC)"] and lines[1].split()[2:] == [A, "u7", "alarm_raised", "9.0", "yes"]
    assert main(["cloud", "alarms", "--store", str(db), "--node", B, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_errors_say_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["cloud", "nodes"]) == ConfigError.exit_code
    assert "--store" in capsys.readouterr().err
    assert main(["cloud", "nodes", "--store", str(tmp_path / "none.db")]) == DataError.exit_code
    assert "no cloud store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # reading never creates a store


def test_cli_broker_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fleet = write_fleet(tmp_path / "fleet.toml", 18831)
    assert main(["broker", "config", "--nodes", str(fleet), "--out", str(tmp_path / "b"), "--no-passwd-tool"]) == 0
    out = capsys.readouterr().out
    assert "mosquitto.conf" in out and "hashed by edgeglm" in out and "new passwords for" in out
    assert (tmp_path / "b" / "credentials.toml").is_file()


def test_cloud_run_cli_stores_acks_and_stops_on_sigterm(mosquitto: Mosquitto, tmp_path: Path) -> None:
    (tmp_path / "cloud.toml").write_text(
        f'client_id = "cli-daemon"\nstats_interval_s = 0.5\n[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\n'
        'protocol = "3.1.1"\n[store]\npath = "cloud.db"\n'
    )
    code = "import sys; from edgeglm.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "cloud", "run", "--config", str(tmp_path / "cloud.toml")],
        stderr=subprocess.PIPE,
        text=True,
    )
    edge = Client(mosquitto)
    try:
        edge.subscribe(Topics(A).ack)
        deadline = time.monotonic() + 20
        while not edge.acks(A) and time.monotonic() < deadline:  # publish until the daemon has subscribed
            edge.publish(Topics(A).telemetry, env(A, [1]))
            time.sleep(0.3)
        edge.wait_ack(A, 1, 1)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        edge.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in err and '"acks_sent": 1' in err
    with SqliteStore(tmp_path / "cloud.db", create=False) as s:
        assert [r.seq for r in s.records(A)] == [1]


def test_cloud_package_is_torch_free_and_exports_what_it_lists() -> None:
    code = (
        "import sys, json, edgeglm.runtime.cloud as c; "
        "print(json.dumps([sorted(m for m in ('torch', 'paho') if m in sys.modules), "
        "[n for n in c.__all__ if not hasattr(c, n)]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[], []]
    assert len(cloud.__all__) == len(set(cloud.__all__))
