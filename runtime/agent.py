"""The edge agent (``edgeglm edge run``): local inference and alarms always, sync when it can.

One thread owns the predictor and the outbox; paho's network thread only hands messages over
through queues. The loop::

    row from the source ─► predictor ─► alarms, predictions ─► outbox (durable, seq'd)
                                                                   │
    ack (cloud) ─► outbox.ack ◄── publish pending records ◄────────┘  (bounded in-flight window)

- The predictor and the alarms never wait for the network: with no broker at all, rows are
  still predicted, alarms still raised (stdout / local log), records still stored.
- A record leaves the outbox only when the cloud acknowledges it (:class:`Ack`, the highest
  contiguous seq stored); a PUBACK from the broker is not enough.
- On every (re)connect, and when acks stop arriving for ``ack_timeout_s``, publishing restarts
  from the last acknowledged seq (retransmissions are idempotent in the cloud store).
- MQTT: paho-mqtt 2.x callbacks (``CallbackAPIVersion.VERSION2``), persistent session
  (clean_session False / clean_start False with a session expiry), retained ``online`` status
  and a last will ``offline``, reconnect backoff with per-node jitter, username/password,
  TLS. Nothing needs MQTT 5: v3.1.1 brokers work the same.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from edgeglm.protocol import Ack, Envelope, Kind, Topics
from edgeglm.runtime.agent_config import AgentConfig

__all__ = ["Agent", "AgentStats"]

log = logging.getLogger("edgeglm.agent")
_END = object()


@dataclass
class AgentStats:
    """What the agent did; ``produced`` counts records written to the outbox."""

    rows: int = 0
    predictions: int = 0
    alarms: int = 0
    produced: int = 0
    published_envelopes: int = 0
    published_records: int = 0
    acks: int = 0
    retransmits: int = 0
    connects: int = 0
    bytes_sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Agent:
    """Runs one node: source → predictor → outbox → MQTT. ``run()`` blocks until the source ends
    (and, with ``drain``, until the outbox is acknowledged) or :meth:`stop` is called."""

    def __init__(self, config: AgentConfig, *, out: Any = None) -> None:
        from edgeglm.runtime.engine import Engine
        from edgeglm.runtime.loop import alarm_config, make_predictor
        from edgeglm.runtime.outbox import Outbox, OutboxConfig
        from edgeglm.runtime.sinks import JsonLinesSink

        self.config = config
        self.node = config.node
        self.topics = Topics(config.node)
        if config.bundle:
            self.engine = Engine.open(
                config.bundle, public_key=config.pubkey, backend=config.backend, threads=config.threads
            )
        else:
            self.engine = Engine.open_installed(config.root, backend=config.backend, threads=config.threads)
        m = self.engine.manifest
        self.model = f"{m.name}:{m.version}"
        overrides = {k: getattr(config.alarm, k) for k in ("rul_low", "rul_clear", "debounce")}
        self.predictor = make_predictor(self.engine, alarm=alarm_config(m, overrides))
        config.outbox_path.parent.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            config.outbox_path,
            node=config.node,
            config=OutboxConfig(
                max_bytes=int(config.outbox.max_mb * 2**20),
                max_age_s=config.outbox.max_age_h * 3600,
                thin_keep_every=config.outbox.thin_keep_every,
            ),
        )
        self.stats = AgentStats()
        self.local = JsonLinesSink(out, kinds={"alarm_raised", "alarm_cleared", "sensor_fault"}) if out else None
        self._log_sink = None
        if config.log_sqlite:
            from edgeglm.runtime.sinks import SqliteSink

            self._log_sink = SqliteSink(config.log_sqlite)
        self._rows_buf: list[list[Any]] = []
        self._buf_started = time.monotonic()
        self._last_health = 0.0
        self._last_step = 0.0
        self._stop = threading.Event()
        self._acks: queue.Queue[Ack] = queue.Queue()
        self._connected = threading.Event()
        self._reconnected = threading.Event()
        self._sent_upto = self.outbox.acked_seq
        self._inflight: list[int] = []  # last seq of each envelope published and not yet acknowledged
        self._gaps_sent: set[int] = set()  # gap records sent ahead of the stream on this connection
        self._last_ack_progress = time.monotonic()
        self._client = self._make_client() if config.sync.enabled else None
        self.metrics_server = None
        if config.metrics_port is not None:
            from edgeglm.runtime.metrics import MetricsServer, RuntimeMetrics

            self.metrics = RuntimeMetrics(
                self.predictor,
                model={"name": m.name, "version": m.version, "backend": self.engine.backend_name, "node": self.node},
            )
            self.metrics_server = MetricsServer(self.metrics, port=config.metrics_port)
        else:
            self.metrics = None

    # --- MQTT ---------------------------------------------------------------------------
    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        s = self.config.sync
        v5 = s.protocol == "5"
        kwargs: dict[str, Any] = {
            "client_id": s.client_id or f"edgeglm-{self.node}",
            "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        }
        if not v5:
            kwargs["clean_session"] = False
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        if s.username:
            c.username_pw_set(s.username, s.resolved_password())
        if s.tls_ca or s.tls_cert:
            c.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
        c.will_set(self.topics.status, json.dumps({"state": "offline", "node": self.node}), qos=1, retain=True)
        jitter = 1.0 + random.random()  # spread a fleet's reconnects after a broker restart
        c.reconnect_delay_set(min_delay=max(1, int(s.reconnect_min_s * jitter)), max_delay=int(s.reconnect_max_s))
        c.max_inflight_messages_set(max(20, s.inflight * 2))
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._v5 = v5
        return c

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.node, reason_code)
            return
        client.subscribe(self.topics.ack, qos=1)
        client.publish(
            self.topics.status,
            json.dumps({"state": "online", "node": self.node, "model": self.model}),
            qos=1,
            retain=True,
        )
        self.stats.connects += 1
        self._connected.set()
        self._reconnected.set()
        log.info("%s: connected (session present: %s)", self.node, flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.info("%s: disconnected (%s)", self.node, reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            ack = Ack.from_bytes(msg.payload)
        except Exception as exc:  # a bad ack must not kill the network thread
            log.warning("%s: ignoring a malformed ack: %s", self.node, exc)
            return
        if ack.node == self.node:
            self._acks.put(ack)

    def _connect(self) -> None:
        s = self.config.sync
        kwargs: dict[str, Any] = {}
        if self._v5:
            import paho.mqtt.client as mqtt
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 7 * 86400
            kwargs = {"clean_start": False, "properties": props}
            _ = mqtt
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive, **kwargs)
        self._client.loop_start()

    # --- the loop -----------------------------------------------------------------------
    def _rows(self) -> Iterator[Any]:
        from edgeglm.runtime.sources import MqttSensorSource, replay_file, stdin_rows

        src = self.config.source
        if src.kind == "replay":
            spec = self.engine.manifest.window_spec
            keep = {*spec["sensor_names"], *spec["setting_names"]}  # the file's unused columns are not bad rows
            while True:
                yield from replay_file(
                    src.path, rate=src.rate, columns=src.columns or None, units=set(src.units) or None, keep=keep
                )
                if not src.loop:
                    return
        elif src.kind == "stdin":
            yield from stdin_rows(sys.stdin)
        else:
            mq = MqttSensorSource(
                src.host, src.port, src.topic, client_id=f"edgeglm-{self.node}-sensors", stream_level=src.stream_level
            )
            try:
                while not self._stop.is_set():
                    row = mq.get(timeout=0.2)
                    yield row if row is not None else _END
            finally:
                mq.close()

    def _handle(self, events: list[Any]) -> None:
        if self.metrics is not None:
            self.metrics.observe(events)
        items: list[tuple[Kind, dict]] = []
        for e in events:
            d = e.to_dict()
            kind = d["event"]
            if kind == "prediction":
                self._rows_buf.append([d["stream"], d["t"], d["rul"], d["health"]])
                self.stats.predictions += 1
            elif kind in ("alarm_raised", "alarm_cleared"):
                self.stats.alarms += kind == "alarm_raised"
                items.append((Kind.ALARM, {**d, "model": self.model}))
            else:
                items.append((Kind.FAULT, d))
        if self.local is not None or self._log_sink is not None:
            for sink in (self.local, self._log_sink):
                if sink is not None:
                    sink.write(events)
        if items:
            self._append(items)

    def _append(self, items: list[tuple[Kind, dict]]) -> None:
        recs = self.outbox.append_many(items)
        self.stats.produced += len(recs)
        for k, _ in items:
            self.stats.by_kind[k.value] = self.stats.by_kind.get(k.value, 0) + 1

    def _flush_predictions(self, *, force: bool = False) -> None:
        s = self.config.sync
        if not self._rows_buf:
            self._buf_started = time.monotonic()
            return
        if (
            force
            or len(self._rows_buf) >= s.rows_per_record
            or time.monotonic() - self._buf_started >= s.flush_interval_s
        ):
            n = s.rows_per_record  # a record holds at most this many rows
            cols = ["stream", "t", "rul", "health"]
            items = [
                (Kind.PREDICTIONS, {"cols": cols, "rows": self._rows_buf[i : i + n], "model": self.model})
                for i in range(0, len(self._rows_buf), n)
            ]
            self._rows_buf = []
            self._buf_started = time.monotonic()
            self._append(items)

    def _health(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_health < self.config.sync.health_interval_s:
            return
        self._last_health = now
        st = self.outbox.stats()
        c = self.predictor.counters
        body = {
            "model": self.model,
            "backend": self.engine.backend_name,
            "rows": c.rows,
            "predictions": c.predictions,
            "bad": c.total(),
            "alarms_active": list(self.predictor.active_alarms()),
            "backlog": st.records,
            "backlog_bytes": st.bytes,
            "coverage_hours": st.coverage_hours,
            "evicted": st.evicted_records,
            "boot": self.outbox.boot,
        }
        self._append([(Kind.HEALTH, body)])

    def _sync(self) -> None:
        """Acks in, records out: one bounded step, never blocking on the network."""
        if self._client is None:
            return
        s = self.config.sync
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                break
            if ack.inc != self.outbox.inc:
                continue
            before = self.outbox.acked_seq
            self.outbox.ack(ack.inc, ack.seq)
            self.stats.acks += 1
            if self.outbox.acked_seq > before:
                self._last_ack_progress = time.monotonic()
            self._inflight = [q for q in self._inflight if q > self.outbox.acked_seq]
        if self._reconnected.is_set():  # replay from the last acknowledged seq
            self._reconnected.clear()
            self._sent_upto = self.outbox.acked_seq
            self._inflight = []
            self._gaps_sent = set()
        if not self._connected.is_set():
            return
        if self._inflight and time.monotonic() - self._last_ack_progress > s.ack_timeout_s:
            self.stats.retransmits += 1
            self._sent_upto = self.outbox.acked_seq
            self._inflight = []
            self._gaps_sent.clear()
            self._last_ack_progress = time.monotonic()
        # Gap records first: each covers evicted seqs below its own, and the cloud's high-water
        # mark cannot pass those until it has the gap (outside the in-flight window; they are few).
        gaps = [g for g in self.outbox.pending(kinds=(Kind.GAP,), limit=64) if g.seq not in self._gaps_sent]
        if gaps:
            payload = Envelope(self.node, self.outbox.inc, self.outbox.boot, tuple(gaps)).to_bytes(s.encoding)
            if self._client.publish(self.topics.telemetry, payload, qos=1).rc == 0:
                self._gaps_sent.update(g.seq for g in gaps)
                self.stats.bytes_sent += len(payload)
        while len(self._inflight) < s.inflight:
            recs = self.outbox.pending(
                after_seq=max(self._sent_upto, self.outbox.acked_seq), limit=s.records_per_publish
            )
            if not recs:
                return
            alarms = [r for r in recs if r.kind is Kind.ALARM]
            other = [r for r in recs if r.kind is not Kind.ALARM]
            for topic, batch in ((self.topics.alarm, alarms), (self.topics.telemetry, other)):
                if batch:
                    payload = Envelope(self.node, self.outbox.inc, self.outbox.boot, tuple(batch)).to_bytes(s.encoding)
                    info = self._client.publish(topic, payload, qos=1)
                    if info.rc != 0:  # not connected any more: try again after the reconnect
                        return
                    self.stats.published_envelopes += 1
                    self.stats.published_records += len(batch)
                    self.stats.bytes_sent += len(payload)
            self._sent_upto = recs[-1].seq
            self._inflight.append(recs[-1].seq)
            if not self._inflight or len(self._inflight) == 1:
                self._last_ack_progress = time.monotonic()

    def drained(self) -> bool:
        return self.outbox.acked_seq >= self.outbox.last_seq

    def run(self, *, drain: bool = False, drain_timeout_s: float = 60.0) -> AgentStats:
        """Process the source until it ends (then drain if asked) or until :meth:`stop`."""
        if self._client is not None:
            self._connect()
        self._health(force=True)
        try:
            for row in self._rows():
                if self._stop.is_set():
                    break
                if row is not _END:
                    self.stats.rows += 1
                    self._handle(self.predictor.push(row))
                now = time.monotonic()
                if now - self._last_step >= 0.005:  # batch the bookkeeping: every 5 ms, not every row
                    self._last_step = now
                    self._flush_predictions()
                    self._health()
                    self._sync()
            self._flush_predictions(force=True)
            self._health(force=True)
            deadline = time.monotonic() + drain_timeout_s
            while drain and not self._stop.is_set() and not self.drained() and time.monotonic() < deadline:
                self._sync()
                time.sleep(0.01)
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._client is not None:
            self._client.publish(
                self.topics.status, json.dumps({"state": "stopped", "node": self.node}), qos=1, retain=True
            )
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self.metrics_server is not None:
            self.metrics_server.close()
        for sink in (self.local, self._log_sink):
            if sink is not None:
                sink.close()
        self.outbox.close()
        self.engine.close()


def install_signal_handlers(agent: Agent) -> None:
    """SIGTERM / SIGINT stop the loop cleanly (records written so far stay in the outbox)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
