"""The EdgeGLM sync protocol, version 1: topics, the record envelope, acknowledgements.

Edge and cloud share this module; it is numpy-free and torch-free. One MQTT message carries
one :class:`Envelope`: a batch of :class:`Record` s of one node, in sequence order::

    Envelope {v: 1, node, inc, boot, records: [Record {seq, kind, t, body}, …]}

- ``node``: the node name, also the topic level and the broker username (ACL ``%u``).
- ``inc`` (incarnation): a random 63-bit id chosen when the node's outbox database is
  created. ``seq`` counts 1, 2, 3 … within an incarnation and never resets while the outbox
  exists; a wiped outbox starts a new incarnation, so the cloud never mistakes new records
  for old ones.
- ``boot``: the agent start count within the incarnation (tells restarts apart; informational).
- ``msg_id`` of a record = ``"{inc:016x}-{seq}"``: unique per node, the same on every
  retransmission, so the cloud stores each record once (idempotent on ``(node, msg_id)``).

The cloud acknowledges on ``edgeglm/v1/{node}/ack`` with :class:`Ack` ``{v, node, inc, seq}``:
every record up to ``seq`` of incarnation ``inc`` is stored (or covered by a ``gap`` record),
so the edge may delete them. A broker PUBACK only means the broker has the message.

Encodings: CBOR (compact, the default on the wire) or JSON; :meth:`Envelope.from_bytes`
tells them apart by the first byte (JSON envelopes start with ``{``). Nothing here depends
on MQTT 5 features, so MQTT 3.1.1 brokers (and the embedded demo broker) work.

Topics (``{node}`` is one topic level)::

    edgeglm/v1/{node}/telemetry        edge → cloud  QoS1  predictions, health, sensor faults, gaps
    edgeglm/v1/{node}/alarm            edge → cloud  QoS1  alarm raised / cleared
    edgeglm/v1/{node}/ack              cloud → edge  QoS1
    edgeglm/v1/{node}/status           edge → cloud  QoS1 retained, last will "offline"
    edgeglm/v1/{node}/twin/desired     cloud → edge  QoS1 retained
    edgeglm/v1/{node}/twin/reported    edge → cloud  QoS1 retained
    edgeglm/v1/{node}/ota/{version}/#  cloud → edge  bundle chunks
    edgeglm/v1/{node}/update           edge → cloud  Top-k sparse model update
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from edgeglm.errors import ProtocolError

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "SHARE_GROUP",
    "Ack",
    "Envelope",
    "Kind",
    "Record",
    "Topics",
    "check_node_name",
    "msg_id",
]

PROTOCOL_VERSION = 1
SHARE_GROUP = "edgeglm-cloud"
#: Largest envelope a reader accepts (bytes on the wire); writers batch below it.
MAX_PAYLOAD_BYTES = 256 * 1024
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_node_name(node: str) -> str:
    """A node name is one topic level and a broker username: ``[A-Za-z0-9._-]``, ≤ 64 characters."""
    if not isinstance(node, str) or not _NODE_RE.match(node):
        raise ProtocolError(
            f"invalid node name {node!r}",
            hint="use letters, digits, '.', '_' or '-' (no '/', '+', '#'), at most 64 characters, e.g. press-07",
        )
    return node


class Topics:
    """Topic names for one node (``Topics("press-07").telemetry``) and the cloud's subscriptions."""

    prefix = f"edgeglm/v{PROTOCOL_VERSION}"

    def __init__(self, node: str) -> None:
        self.node = check_node_name(node)
        base = f"{self.prefix}/{node}"
        self.telemetry = f"{base}/telemetry"
        self.alarm = f"{base}/alarm"
        self.ack = f"{base}/ack"
        self.status = f"{base}/status"
        self.twin_desired = f"{base}/twin/desired"
        self.twin_reported = f"{base}/twin/reported"
        self.update = f"{base}/update"
        self.ota_prefix = f"{base}/ota"

    def ota(self, version: str, *rest: str) -> str:
        return "/".join([self.ota_prefix, version, *rest])

    @classmethod
    def cloud_subscriptions(cls, *, shared: bool = True) -> list[str]:
        """What a cloud daemon subscribes to; shared (``$share/edgeglm-cloud/…``) to split the load."""
        subs = [
            f"{cls.prefix}/+/telemetry",
            f"{cls.prefix}/+/alarm",
            f"{cls.prefix}/+/status",
            f"{cls.prefix}/+/twin/reported",
            f"{cls.prefix}/+/update",
        ]
        return [f"$share/{SHARE_GROUP}/{s}" if shared and not s.endswith(("status", "reported")) else s for s in subs]

    @classmethod
    def parse(cls, topic: str) -> tuple[str, str]:
        """``edgeglm/v1/press-07/telemetry`` → ``("press-07", "telemetry")``; other topics → ProtocolError."""
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != "edgeglm" or not parts[1].startswith("v"):
            raise ProtocolError(f"not an EdgeGLM topic: {topic!r}")
        if parts[1] != f"v{PROTOCOL_VERSION}":
            raise ProtocolError(
                f"topic {topic!r} is protocol {parts[1]}; this EdgeGLM speaks v{PROTOCOL_VERSION}",
                hint="upgrade the older side",
            )
        return check_node_name(parts[2]), "/".join(parts[3:])


class Kind(str, Enum):
    """What a record carries."""

    PREDICTIONS = "predictions"  # a batch of predictions of one or more streams (telemetry)
    ALARM = "alarm"  # alarm raised / cleared (never evicted from the outbox)
    FAULT = "fault"  # sensor fault, rejected rows
    HEALTH = "health"  # agent health: counters, model version, backlog
    GAP = "gap"  # records the outbox had to drop: seq ranges, count, reason

    @property
    def evictable(self) -> bool:
        return self is not Kind.ALARM and self is not Kind.GAP


def msg_id(inc: int, seq: int) -> str:
    """The record's id, unique per node and stable across retransmissions."""
    return f"{inc:016x}-{seq}"


@dataclass(frozen=True)
class Record:
    """One durable record: ``seq`` within the node's incarnation, ``t`` wall-clock seconds."""

    seq: int
    kind: Kind
    t: float
    body: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind.value, "t": self.t, "body": self.body}

    @classmethod
    def from_wire(cls, d: Any) -> Record:
        if not isinstance(d, dict):
            raise ProtocolError(f"record is a {type(d).__name__}, not a map")
        seq, kind, t, body = d.get("seq"), d.get("kind"), d.get("t"), d.get("body", {})
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ProtocolError(f"record seq must be an integer ≥ 1, not {seq!r}")
        try:
            k = Kind(kind)
        except ValueError:
            raise ProtocolError(
                f"unknown record kind {kind!r}; known: {', '.join(x.value for x in Kind)}",
                hint="upgrade the cloud daemon if the edge is newer",
            ) from None
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise ProtocolError(f"record t must be a number, not {t!r}")
        if not isinstance(body, dict):
            raise ProtocolError(f"record body must be a map, not {type(body).__name__}")
        return cls(seq, k, float(t), body)


@dataclass(frozen=True)
class Envelope:
    """One MQTT message: a node's records in increasing ``seq`` order."""

    node: str
    inc: int
    boot: int
    records: tuple[Record, ...]
    v: int = PROTOCOL_VERSION

    def to_bytes(self, encoding: str = "cbor") -> bytes:
        doc = {
            "v": self.v,
            "node": self.node,
            "inc": self.inc,
            "boot": self.boot,
            "records": [r.to_wire() for r in self.records],
        }
        if encoding == "json":
            return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        if encoding == "cbor":
            import cbor2

            return cbor2.dumps(doc)
        raise ValueError(f"encoding {encoding!r}: use 'cbor' or 'json'")

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Envelope:
        """Decode and validate; every problem is a :class:`ProtocolError` naming it (never a wrong envelope)."""
        if len(data) > max_bytes:
            raise ProtocolError(f"envelope of {len(data)} bytes exceeds the {max_bytes}-byte limit")
        if not data:
            raise ProtocolError("empty envelope")
        try:
            if data[:1] == b"{":
                doc = json.loads(data)
            else:
                import cbor2

                doc = cbor2.loads(data)
        except Exception as exc:  # json and cbor2 raise several error types for bad input
            raise ProtocolError(f"undecodable envelope ({len(data)} bytes): {type(exc).__name__}: {exc}") from exc
        if not isinstance(doc, dict):
            raise ProtocolError(f"envelope is a {type(doc).__name__}, not a map")
        v = doc.get("v")
        if v != PROTOCOL_VERSION:
            node = doc.get("node", "?")
            raise ProtocolError(
                f"envelope v{v} from node {node}; this side speaks v{PROTOCOL_VERSION}",
                hint="upgrade the agent" if isinstance(v, int) and v < PROTOCOL_VERSION else "upgrade the cloud daemon",
            )
        node = check_node_name(doc.get("node"))
        inc, boot, records = doc.get("inc"), doc.get("boot"), doc.get("records")
        for name, val in (("inc", inc), ("boot", boot)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ProtocolError(f"envelope {name} must be a non-negative integer, not {val!r}")
        if not isinstance(records, list) or not records:
            raise ProtocolError("envelope has no records")
        recs = tuple(Record.from_wire(r) for r in records)
        if any(b.seq <= a.seq for a, b in itertools.pairwise(recs)):
            raise ProtocolError("envelope records are not in increasing seq order")
        return cls(node, inc, boot, recs)


@dataclass(frozen=True)
class Ack:
    """Cloud → edge: every record of incarnation ``inc`` up to ``seq`` is stored or covered by a gap."""

    node: str
    inc: int
    seq: int
    v: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"v": self.v, "node": self.node, "inc": self.inc, "seq": self.seq}, separators=(",", ":")
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Ack:
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"undecodable ack: {exc}") from exc
        if not isinstance(d, dict) or d.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"ack of another protocol version: {str(d)[:80]}", hint="upgrade the older side")
        node, inc, seq = d.get("node"), d.get("inc"), d.get("seq")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (inc, seq)):
            raise ProtocolError(f"ack inc/seq must be non-negative integers: {str(d)[:80]}")
        return cls(check_node_name(node), inc, seq)
