"""The cloud sync daemon (``edgeglm cloud run``): MQTT in, idempotent store, acknowledgements out.

For every message on ``edgeglm/v1/{node}/telemetry`` or ``…/alarm``::

    Topics.parse(topic) → Envelope.from_bytes(payload) → envelope.node == topic node?
        → store.put_envelope (one transaction) → publish Ack(node, inc, hwm) on edgeglm/v1/{node}/ack

The ack (QoS 1, not retained) carries the incarnation's high-water mark (see
:mod:`edgeglm.runtime.cloud.store`), never just "got it": the edge deletes up to that seq.
Anything that is not a valid envelope of the topic's node is *garbage*: it is logged, counted
by :class:`Rejection` reason, and neither stored nor acknowledged; the daemon keeps running.
The retained ``…/status`` topic (``{"state": "online" | "stopped"}`` from the agent, ``offline``
as its last will) updates the fleet view.

Scale-out: telemetry and alarms are subscribed through a shared subscription
(``$share/{share_group}/edgeglm/v1/+/telemetry``), so the broker hands each message to one
daemon of the group; Mosquitto offers ``$share`` to MQTT 3.1.1 and 5 clients alike. Status is
subscribed unshared (every daemon sees it). Daemons of one group must write to one store.

Sessions are persistent (MQTT 3.1.1 ``clean_session=False``; MQTT 5 ``clean_start=False`` with a
session expiry), so messages that arrive while a daemon restarts wait at the broker. paho
acknowledges a message (PUBACK) only after :meth:`CloudDaemon._on_message` returns, i.e. after
the store committed; if the store fails, no EdgeGLM ack goes out and the edge retransmits.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from edgeglm.errors import ConfigError, ProtocolError
from edgeglm.protocol import MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, SHARE_GROUP, Ack, Envelope, Topics
from edgeglm.runtime.cloud.store import NodeStatus, SqliteStore, Store

__all__ = [
    "CONFIG_SCHEMA_VERSION",
    "BrokerConfig",
    "CloudConfig",
    "CloudCounters",
    "CloudDaemon",
    "MqttProtocol",
    "Rejection",
    "StoreConfig",
    "TlsConfig",
    "cloud_subscriptions",
    "load_cloud_config",
    "open_store",
]

log = logging.getLogger("edgeglm.cloud")

CONFIG_SCHEMA_VERSION = 1
_GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class MqttProtocol(str, Enum):
    """The MQTT version the daemon speaks (``protocol = "3.1.1"`` or ``"5"`` in ``[broker]``)."""

    V311 = "3.1.1"
    V5 = "5"


class Rejection(str, Enum):
    """Why a message was garbage (the key of :attr:`CloudCounters.garbage`)."""

    TOPIC = "topic"  # not an edgeglm/v1/{node}/… topic
    OVERSIZED = "oversized"  # larger than MAX_PAYLOAD_BYTES
    UNDECODABLE = "undecodable"  # neither CBOR nor JSON (e.g. truncated), or empty
    VERSION = "version"  # an envelope of another protocol version
    SCHEMA = "schema"  # decodes, but is not a valid envelope
    NODE_MISMATCH = "node_mismatch"  # the envelope's node is not the topic's node
    RECORD = "record"  # a record the store refuses (bad gap ranges, non-JSON body, non-finite t)
    STATUS = "status"  # a status payload other than online/offline/stopped, or of another node


def _check(cond: bool, key: str, value: Any, valid: str, hint: str) -> None:
    if not cond:
        raise ConfigError(f"cloud config: {key} = {value!r}; valid: {valid}", hint=hint)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class TlsConfig:
    """``[broker.tls]``: TLS to the broker; ``ca`` omitted means the system's CAs.

    Args:
        ca: CA bundle (PEM) that signed the broker's certificate (default: system CAs).
        cert: client certificate (PEM), for brokers that require one; needs ``key``.
        key: the client certificate's private key (PEM).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        _check(
            (self.cert is None) == (self.key is None),
            "broker.tls.cert/key",
            (self.cert, self.key),
            "both or neither",
            "a client certificate needs its key: set broker.tls.cert and broker.tls.key together",
        )
        for name in ("ca", "cert", "key"):
            p = getattr(self, name)
            _check(
                p is None or Path(p).is_file(),
                f"broker.tls.{name}",
                str(p),
                "an existing PEM file",
                "fix the path (relative paths are relative to the config file)",
            )


@dataclass(frozen=True)
class BrokerConfig:
    """``[broker]``: where and how the daemon connects.

    Args:
        host: broker host name or address (default: 127.0.0.1).
        port: TCP port (default: 1883; 8883 is usual with TLS).
        protocol: :class:`MqttProtocol` (default: 5).
        username: the cloud user (``[cloud] username`` of ``edgeglm broker config``; default: none).
        password: its password (or ``password_file``: a file holding it); never printed.
        tls: :class:`TlsConfig` or ``None`` for plain TCP.
        keepalive_s: MQTT keep-alive in seconds (default: 30).
        session_expiry_s: how long the broker keeps the session (queued messages) of a stopped
            daemon, MQTT 5 only; MQTT 3.1.1 sessions live until the broker's
            ``persistent_client_expiration`` (default: 7 days).
        reconnect_min_s / reconnect_max_s: reconnect back-off, doubling from min to max
            (default: 1 and 60 s).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: MqttProtocol = MqttProtocol.V5
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsConfig | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60

    def __post_init__(self) -> None:
        _check(isinstance(self.host, str) and bool(self.host), "broker.host", self.host, "a host name", "set host")
        _check(_is_int(self.port) and 0 < self.port < 65536, "broker.port", self.port, "1..65535", "e.g. 1883")
        try:
            value = self.protocol if isinstance(self.protocol, MqttProtocol) else str(self.protocol)
            object.__setattr__(self, "protocol", MqttProtocol(value))
        except ValueError:
            _check(False, "broker.protocol", self.protocol, '"3.1.1" or "5"', 'write protocol = "5" (or "3.1.1")')
        for name in ("username", "password"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v != ""), f"broker.{name}", "…", "a non-empty string", "fix it")
        _check(
            self.password is None or self.username is not None,
            "broker.password",
            "…",
            "a password together with a username",
            "set broker.username (the cloud user)",
        )
        _check(
            _is_int(self.keepalive_s) and 5 <= self.keepalive_s <= 65535,
            "broker.keepalive_s",
            self.keepalive_s,
            "5..65535",
            "e.g. 30",
        )
        _check(
            _is_int(self.session_expiry_s) and 0 < self.session_expiry_s <= 0xFFFFFFFF,
            "broker.session_expiry_s",
            self.session_expiry_s,
            "1..4294967295 seconds",
            "a persistent session needs an expiry > 0, e.g. 604800 (7 days)",
        )
        lo, hi = self.reconnect_min_s, self.reconnect_max_s
        _check(_is_int(lo) and lo >= 1, "broker.reconnect_min_s", lo, "an integer ≥ 1", "e.g. 1")
        _check(_is_int(hi) and hi >= lo, "broker.reconnect_max_s", hi, f"an integer ≥ {lo} (reconnect_min_s)", "60")


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: ``path`` of a SQLite file (default ``cloud.db``) or ``dsn`` of a PostgreSQL database."""

    path: Path | None = Path("cloud.db")
    dsn: str | None = None

    def __post_init__(self) -> None:
        if self.dsn is not None:
            _check(
                isinstance(self.dsn, str) and self.dsn.startswith(("postgresql://", "postgres://")),
                "store.dsn",
                self.dsn,
                "a PostgreSQL URL postgresql://user@host/db",
                "or use store.path for SQLite",
            )
            object.__setattr__(self, "path", None)


@dataclass(frozen=True)
class CloudConfig:
    """The daemon's configuration (``cloud.toml``, see :func:`load_cloud_config`).

    Args:
        broker: :class:`BrokerConfig`.
        store: :class:`StoreConfig`.
        client_id: the MQTT client id; its persistent session lives at the broker under this
            id, so every daemon needs its own (default: ``edgeglm-cloud-{hostname}``).
        share_group: the shared-subscription group; daemons of one group split the load.
            ``""`` subscribes unshared (default: ``edgeglm-cloud``).
        stats_interval_s: how often :meth:`CloudDaemon.run` logs its counters (default: 60).
        schema_version: layout of this config (1).

    Example ``cloud.toml``::

        schema_version = 1
        client_id = "edgeglm-cloud-1"

        [broker]
        host = "broker.factory.example"
        port = 8883
        protocol = "5"
        username = "edgeglm-cloud"
        password_file = "cloud.password"

        [broker.tls]
        ca = "ca.pem"

        [store]
        path = "/var/lib/edgeglm/cloud.db"
    """

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    client_id: str = field(default_factory=lambda: f"edgeglm-cloud-{socket.gethostname()}")
    share_group: str = SHARE_GROUP
    stats_interval_s: float = 60.0
    schema_version: int = CONFIG_SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(
            self.schema_version == CONFIG_SCHEMA_VERSION,
            "schema_version",
            self.schema_version,
            str(CONFIG_SCHEMA_VERSION),
            f"write the cloud config for schema_version = {CONFIG_SCHEMA_VERSION}",
        )
        _check(
            isinstance(self.client_id, str) and 0 < len(self.client_id) <= 128,
            "client_id",
            self.client_id,
            "1..128 characters",
            "give every daemon its own id, e.g. edgeglm-cloud-1",
        )
        _check(
            self.share_group == "" or (isinstance(self.share_group, str) and bool(_GROUP_RE.match(self.share_group))),
            "share_group",
            self.share_group,
            "letters, digits, '.', '_', '-' (no '/', '+', '#'), or \"\" for no sharing",
            f"e.g. {SHARE_GROUP}",
        )
        _check(
            _is_num(self.stats_interval_s) and self.stats_interval_s > 0,
            "stats_interval_s",
            self.stats_interval_s,
            "a number > 0",
            "e.g. 60",
        )


def _table(doc: Any, key: str) -> dict[str, Any]:
    _check(isinstance(doc, dict), key, type(doc).__name__, "a table", f"write [{key}]")
    return doc


def _known(doc: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"cloud config: unknown key {name}; known: {', '.join(sorted(known))}", hint="fix the key")


def load_cloud_config(path: Path | str) -> CloudConfig:
    """Read and validate a ``cloud.toml`` (see :class:`CloudConfig`); relative paths are relative to it.

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, or a value is invalid
            (the message names the key).
    """
    from edgeglm.tomlfile import read_toml

    path = Path(path)
    doc = read_toml(path, what="cloud config", hint="write one (see 'edgeglm cloud run --help')")
    base = path.resolve().parent

    def rel(p: Any, key: str) -> Path:
        _check(isinstance(p, str) and p != "", key, p, "a path", "fix the path")
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    _known(doc, {"schema_version", "client_id", "share_group", "stats_interval_s", "broker", "store"}, "")
    top = {k: v for k, v in doc.items() if k not in ("broker", "store")}

    b = dict(_table(doc.get("broker", {}), "broker"))
    broker_known = {f.name for f in fields(BrokerConfig)} | {"password_file"}
    _known(b, broker_known, "broker")
    if "password_file" in b:
        _check("password" not in b, "broker.password_file", "…", "password or password_file, not both", "keep one")
        pw_path = rel(b.pop("password_file"), "broker.password_file")
        try:
            b["password"] = pw_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cloud config: broker.password_file {pw_path}: {exc}", hint="fix the path") from exc
    if "tls" in b:
        t = dict(_table(b["tls"], "broker.tls"))
        _known(t, {"ca", "cert", "key"}, "broker.tls")
        b["tls"] = TlsConfig(**{k: rel(v, f"broker.tls.{k}") for k, v in t.items()})
    broker = BrokerConfig(**b)

    s = dict(_table(doc.get("store", {}), "store"))
    _known(s, {"path", "dsn"}, "store")
    _check(not ("path" in s and "dsn" in s), "store", "path and dsn", "one of path, dsn", "keep one")
    store = StoreConfig(dsn=s["dsn"]) if "dsn" in s else StoreConfig(path=rel(s.get("path", "cloud.db"), "store.path"))
    return CloudConfig(broker=broker, store=store, **top)


def open_store(config: StoreConfig, *, create: bool = True) -> Store:
    """The :class:`Store` a :class:`StoreConfig` names (SQLite; PostgreSQL is designed, not shipped).

    Raises:
        ConfigError: ``dsn`` is set (no PostgreSQL store in this version).
        DataError: the SQLite file is missing (``create=False``), unusable, or of another schema.
    """
    if config.dsn is not None:
        raise ConfigError(
            "cloud config: store.dsn (PostgreSQL) is not available in this EdgeGLM version",
            hint="use store.path (SQLite); see edgeglm.runtime.cloud.store for the PostgreSQL design",
        )
    assert config.path is not None
    return SqliteStore(config.path, create=create)


def cloud_subscriptions(share_group: str = SHARE_GROUP) -> list[str]:
    """What the daemon subscribes to: telemetry and alarms shared (unless ``share_group == ""``), status unshared."""
    data = [f"{Topics.prefix}/+/telemetry", f"{Topics.prefix}/+/alarm"]
    shared = [f"$share/{share_group}/{t}" for t in data] if share_group else data
    return [*shared, f"{Topics.prefix}/+/status"]


@dataclass(frozen=True)
class CloudCounters:
    """A snapshot of what the daemon has done since it started.

    ``received``: messages; ``envelopes``: valid envelopes stored (including pure retransmissions);
    ``stored`` / ``duplicates``: records; ``garbage``: rejected messages by :class:`Rejection` value;
    ``store_errors``: envelopes the store failed on (not acknowledged; the edge retransmits);
    ``internal_errors``: unexpected exceptions survived in the message handler.
    """

    received: int = 0
    envelopes: int = 0
    stored: int = 0
    duplicates: int = 0
    acks_sent: int = 0
    ack_errors: int = 0
    status_updates: int = 0
    ignored: int = 0
    store_errors: int = 0
    internal_errors: int = 0
    garbage: dict[str, int] = field(default_factory=dict)

    @property
    def garbage_total(self) -> int:
        return sum(self.garbage.values())

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["garbage"] = dict(self.garbage)
        return d


class _Rejected(Exception):
    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _peek(data: bytes) -> Any:
    """Decode a payload that failed validation, to tell a version mismatch from a schema error."""
    try:
        if data[:1] == b"{":
            return json.loads(data)
        import cbor2

        return cbor2.loads(data)
    except Exception:  # anything undecodable is reported as such by the caller
        return None


def _classify(data: bytes, exc: ProtocolError) -> Rejection:
    if exc.__cause__ is not None or not data:
        return Rejection.UNDECODABLE
    doc = _peek(data)
    if doc is None:
        return Rejection.UNDECODABLE
    if isinstance(doc, dict) and _is_int(doc.get("v")) and doc.get("v") != PROTOCOL_VERSION:
        return Rejection.VERSION
    return Rejection.SCHEMA


def _parse_status(node: str, payload: bytes) -> NodeStatus:
    """The agent's ``{"state": "online" | "offline" | "stopped", "node": …}`` (or the bare word)."""
    text = payload.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("node", node) != node:
            raise _Rejected(Rejection.STATUS, f"status of node {doc.get('node')!r} on the topic of node {node!r}")
        text = str(doc.get("state", "")) if isinstance(doc, dict) else ""
    try:
        status = NodeStatus(text.lower())
    except ValueError:
        status = NodeStatus.UNKNOWN
    if status is NodeStatus.UNKNOWN:
        raise _Rejected(Rejection.STATUS, f"status payload {payload[:60]!r} is not online, offline or stopped")
    return status


class CloudDaemon:
    """Ingest telemetry and alarms from the fleet into a :class:`Store` and acknowledge them.

    Args:
        config: :class:`CloudConfig`.
        store: the store to write (default: :func:`open_store` of ``config.store``, closed by
            :meth:`stop`; a store passed in is left open).

    Example::

        daemon = CloudDaemon(load_cloud_config("cloud.toml"))
        daemon.run()  # blocks; stop() from another thread or SIGTERM (the CLI) ends it

        with CloudDaemon(config) as daemon:  # background thread
            daemon.wait_ready(10)
            print(daemon.counters)
    """

    def __init__(self, config: CloudConfig, *, store: Store | None = None) -> None:
        self.config = config
        self._own_store = store is None
        self._store = store
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.name: 0 for f in fields(CloudCounters) if f.name != "garbage"}
        self._garbage: dict[str, int] = {}
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._sub_mid: int | None = None
        self._client: Any = None
        self.subscriptions = cloud_subscriptions(config.share_group)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the store, connect in the background (retrying with back-off) and return."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        with self._lock:
            if self._started:
                return
            self._started = True
        if self._store is None:
            self._store = open_store(self.config.store)
        b = self.config.broker
        v5 = b.protocol is MqttProtocol.V5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls is not None:
            client.tls_set(
                ca_certs=str(b.tls.ca) if b.tls.ca else None,
                certfile=str(b.tls.cert) if b.tls.cert else None,
                keyfile=str(b.tls.key) if b.tls.key else None,
            )
        client.reconnect_delay_set(b.reconnect_min_s, b.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry_s
        client.connect_async(b.host, b.port, keepalive=b.keepalive_s, clean_start=False, properties=props)
        self._client = client
        log.info(
            "cloud daemon %s: connecting to %s:%d (MQTT %s%s), store %s, subscriptions %s",
            self.config.client_id,
            b.host,
            b.port,
            b.protocol.value,
            ", TLS" if b.tls else "",
            self.config.store.path or "PostgreSQL",
            ", ".join(self.subscriptions),
        )
        client.loop_start()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait until connected and every subscription is granted; False on timeout."""
        return self._ready.wait(timeout_s)

    def run(self) -> None:
        """:meth:`start`, then block until :meth:`stop` (from a signal handler or another thread), logging counters."""
        self.start()
        try:
            while not self._stopped.wait(self.config.stats_interval_s):
                log.info("counters: %s", json.dumps(self.counters.to_dict(), sort_keys=True))
        finally:
            self.stop()

    def stop(self) -> None:
        """Disconnect (the broker keeps the persistent session), stop the network thread, close the store."""
        with self._lock:
            if self._stopped.is_set() and self._client is None:
                return
            self._stopped.set()
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._ready.clear()
        if self._own_store and self._store is not None:
            self._store.close()
            self._store = None
        log.info("cloud daemon %s stopped: %s", self.config.client_id, json.dumps(self.counters.to_dict()))

    def __enter__(self) -> CloudDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- counters -------------------------------------------------------------------------------
    @property
    def counters(self) -> CloudCounters:
        with self._lock:
            return CloudCounters(**self._counts, garbage=dict(self._garbage))

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _reject(self, topic: str, r: _Rejected) -> None:
        with self._lock:
            n = self._garbage[r.reason.value] = self._garbage.get(r.reason.value, 0) + 1
        if n <= 10 or n & (n - 1) == 0:  # the first ten, then every power of two: a flood does not flood the log
            log.warning("garbage #%d (%s) on %s: %s", n, r.reason.value, topic, r.detail)

    # -- paho callbacks (network thread) --------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error(
                "broker refused the connection: %s (check broker.username/password and the broker's ACL)", reason_code
            )
            return
        log.info("connected (session present: %s); subscribing", flags.session_present)
        _, self._sub_mid = client.subscribe([(t, 1) for t in self.subscriptions])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: list, properties: Any) -> None:
        refused = [(t, rc) for t, rc in zip(self.subscriptions, reason_codes, strict=False) if rc.is_failure]
        for t, rc in refused:
            log.error("subscription %s refused: %s (the cloud user needs readwrite on edgeglm/v1/#)", t, rc)
        if not refused and mid == self._sub_mid:
            self._ready.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._ready.clear()
        if not self._stopped.is_set():
            log.warning("disconnected from the broker (%s); reconnecting with back-off", reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._count("received")
        topic = "?"
        try:
            topic = msg.topic
            self._handle(client, topic, msg.payload)
        except _Rejected as r:
            self._reject(topic, r)
        except Exception:  # the network thread must survive anything; counted and logged with the traceback
            self._count("internal_errors")
            log.exception("unexpected error handling a message on %s", topic)

    def _handle(self, client: Any, topic: str, payload: bytes) -> None:
        try:
            node, what = Topics.parse(topic)
        except ProtocolError as exc:
            raise _Rejected(Rejection.TOPIC, exc.message) from None
        if what == "status":
            if payload:  # an empty retained message clears the topic: nothing to record
                self._store_required().set_node_status(node, _parse_status(node, payload), time.time())
                self._count("status_updates")
            return
        if what not in ("telemetry", "alarm"):
            self._count("ignored")
            return
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise _Rejected(Rejection.OVERSIZED, f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            env = Envelope.from_bytes(payload)
        except ProtocolError as exc:
            raise _Rejected(_classify(payload, exc), exc.message) from None
        if env.node != node:
            raise _Rejected(
                Rejection.NODE_MISMATCH,
                f"envelope of node {env.node!r} on the topic of node {node!r} (a node may only send as itself)",
            )
        store = self._store_required()
        try:
            result = store.put_envelope(env, time.time())
        except ProtocolError as exc:
            raise _Rejected(Rejection.RECORD, exc.message) from None
        except Exception:  # any store failure: no ack, the edge retransmits
            self._count("store_errors")
            log.exception("store failed on an envelope of %s (inc %x); not acknowledged", node, env.inc)
            return
        with self._lock:
            self._counts["envelopes"] += 1
            self._counts["stored"] += result.new
            self._counts["duplicates"] += result.duplicate
        from paho.mqtt.enums import MQTTErrorCode

        info = client.publish(Topics(node).ack, Ack(node, env.inc, result.covered_hwm).to_bytes(), qos=1)
        # paho queues a QoS 1 publish while disconnected and sends it on reconnect
        queued = info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
        self._count("acks_sent" if queued else "ack_errors")

    def _store_required(self) -> Store:
        store = self._store
        if store is None:
            raise RuntimeError("the daemon's store is closed")
        return store
