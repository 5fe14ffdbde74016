"""``edge.toml``: the edge agent's configuration, as frozen dataclasses validated at load.

Every key is typed; an unknown key or a bad value is a :class:`ConfigError` naming the key
(``sync.port: expected an integer 1..65535, got "1883x"``). Example::

    [agent]
    node = "press-07"                 # this node's name: topic level and broker username
    root = "/opt/edgeglm"             # device root: the installed model, the outbox

    [source]
    kind = "replay"                   # replay | mqtt | stdin
    path = "/data/line1.csv"          # replay: C-MAPSS text or CSV
    rate = 10.0                       # replay rows per second (0 = as fast as possible)

    [sync]
    host = "broker.factory.local"
    port = 8883
    username = "press-07"
    password_file = "/etc/edgeglm/mqtt-password"
    tls_ca = "/etc/edgeglm/ca.pem"
    protocol = "3.1.1"                # or "5"

    [outbox]
    max_mb = 64
    max_age_h = 168
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeglm.errors import ConfigError
from edgeglm.protocol import check_node_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AgentConfig", "AlarmOverrides", "OutboxSection", "SourceConfig", "SyncConfig", "load_agent_config"]


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "replay"
    path: str | None = None
    rate: float = 0.0
    columns: tuple[str, ...] = ()
    units: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    port: int = 1883
    topic: str = "edgeglm/sensors/+"
    stream_level: int | None = None
    loop: bool = False  # replay again from the start when the file ends (demo lines)

    def __post_init__(self) -> None:
        _choice("source.kind", self.kind, ("replay", "mqtt", "stdin"))
        if self.kind == "replay" and not self.path:
            raise ConfigError('source.path is required for kind = "replay"', hint='e.g. path = "/data/line1.csv"')
        _range("source.rate", self.rate, 0.0, 1e7)
        _range("source.port", self.port, 1, 65535)


@dataclass(frozen=True)
class SyncConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    protocol: str = "3.1.1"
    keepalive: int = 30
    client_id: str | None = None
    encoding: str = "cbor"
    rows_per_record: int = 100  # prediction rows batched into one PREDICTIONS record
    flush_interval_s: float = 1.0  # … or flushed after this long
    records_per_publish: int = 64  # records per MQTT message (envelope)
    inflight: int = 16  # envelopes published and not yet acknowledged by the cloud
    ack_timeout_s: float = 10.0  # no ack progress for this long → retransmit from the last ack
    health_interval_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        _choice("sync.protocol", self.protocol, ("3.1.1", "5"))
        _choice("sync.encoding", self.encoding, ("cbor", "json"))
        _range("sync.port", self.port, 1, 65535)
        for key in ("rows_per_record", "records_per_publish", "inflight", "keepalive"):
            _range(f"sync.{key}", getattr(self, key), 1, 10**6)
        for key in ("flush_interval_s", "ack_timeout_s", "health_interval_s", "reconnect_min_s", "reconnect_max_s"):
            _range(f"sync.{key}", getattr(self, key), 0.001, 10**6)
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ConfigError("sync.reconnect_max_s must be ≥ sync.reconnect_min_s")
        if self.password and self.password_file:
            raise ConfigError("give sync.password or sync.password_file, not both")

    def resolved_password(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"sync.password_file: cannot read {self.password_file}: {exc.strerror}") from exc
        return self.password


@dataclass(frozen=True)
class OutboxSection:
    path: str = "outbox.db"  # relative to agent.root
    max_mb: float = 64.0
    max_age_h: float = 168.0
    thin_keep_every: int = 2

    def __post_init__(self) -> None:
        _range("outbox.max_mb", self.max_mb, 0.001, 10**6)
        _range("outbox.max_age_h", self.max_age_h, 0.001, 10**6)
        _range("outbox.thin_keep_every", self.thin_keep_every, 2, 10**6)


@dataclass(frozen=True)
class AlarmOverrides:
    rul_low: float | None = None
    rul_clear: float | None = None
    debounce: int | None = None


@dataclass(frozen=True)
class AgentConfig:
    node: str
    root: str = "/opt/edgeglm"
    bundle: str | None = None  # run this bundle file instead of the installed one (needs pubkey)
    pubkey: str | None = None
    backend: str | None = None
    threads: int | None = None
    metrics_port: int | None = None
    log_sqlite: str | None = None
    source: SourceConfig = field(default_factory=SourceConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    alarm: AlarmOverrides = field(default_factory=AlarmOverrides)

    def __post_init__(self) -> None:
        try:
            check_node_name(self.node)
        except Exception as exc:
            raise ConfigError(f"agent.node: {exc}", hint="letters, digits, '.', '_', '-'; e.g. press-07") from None
        if self.bundle and not self.pubkey:
            raise ConfigError("agent.bundle needs agent.pubkey (the key the bundle is signed with)")

    @property
    def outbox_path(self) -> Path:
        p = Path(self.outbox.path)
        return p if p.is_absolute() else Path(self.root) / p


_SECTIONS = {"source": SourceConfig, "sync": SyncConfig, "outbox": OutboxSection, "alarm": AlarmOverrides}


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(valid)}")


def _range(key: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{key}: expected a number in {lo:g}..{hi:g}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {', '.join(f'{where}.{k}' for k in unknown)}",
            hint=f"valid keys in [{where}]: {', '.join(valid)}",
        )
    kwargs = {}
    for k, v in data.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from exc


def load_agent_config(path: Path | str | None = None, *, text: str | None = None) -> AgentConfig:
    """Read and validate ``edge.toml`` (or TOML ``text``)."""
    where = str(path) if path else "edge.toml"
    try:
        doc = tomllib.loads(text if text is not None else Path(path).read_text())  # type: ignore[arg-type]
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}", hint="pass --config edge.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"agent", *_SECTIONS})
    if unknown:
        raise ConfigError(
            f"{where}: unknown section [{', '.join(unknown)}]",
            hint=f"sections: [agent], {', '.join(f'[{s}]' for s in _SECTIONS)}",
        )
    agent = dict(doc.get("agent", {}))
    if "node" not in agent:
        raise ConfigError(f"{where}: agent.node is required", hint='[agent]\nnode = "press-07"')
    parts = {name: _build(cls, dict(doc.get(name, {})), name) for name, cls in _SECTIONS.items()}
    return _build(AgentConfig, {**agent, **parts}, "agent") if not set(agent) & set(parts) else _bad(where)


def _bad(where: str) -> AgentConfig:
    raise ConfigError(f"{where}: put sections as [source], [sync], … tables, not keys of [agent]")
