"""The cloud's record store: idempotent on ``(node, msg_id)``, with a per-incarnation high-water mark.

What the cloud acknowledges (protocol v1, :class:`edgeglm.protocol.Ack`) is the **high-water
mark** of an incarnation: the highest ``h`` such that every ``seq`` in ``1..h`` is *covered*::

    covered(node, inc) = {seq of every stored record} ∪ {a..b for every [a, b] in a GAP record's "ranges"}
    hwm(node, inc)     = max {h ≥ 0 : 1..h ⊆ covered(node, inc)}

A GAP record (``{"ranges": [[a, b], …], "count": n, "reason": "…"}``) tells that the outbox
dropped those seqs for good (eviction when full); each range must satisfy ``1 ≤ a ≤ b < seq``
of the GAP record itself, because the outbox writes the gap after dropping. Coverage is kept
as merged, disjoint intervals ``[lo, hi]`` in the ``coverage`` table, so a node that sends
1..1000 in order has one row, and a hole (a lost or still-travelling message) is two rows
until it is filled. The hwm is the ``hi`` of the interval starting at 1, or 0.

Writes are idempotent: a record is keyed on ``(node, msg_id)`` with
``msg_id = f"{inc:016x}-{seq}"`` and inserted with ``ON CONFLICT DO NOTHING`` (the portable
spelling of SQLite's ``INSERT OR IGNORE``); a retransmission is counted as a duplicate and
never stored twice, and its seqs merge into coverage that already holds them. One envelope
is one transaction: its records, its coverage, the node row and the alarm state commit together.

Portability (PostgreSQL for large fleets): :class:`SqlStore` holds every query and speaks
plain DB-API 2. The DDL uses types both engines know (``TEXT``, ``BIGINT``,
``DOUBLE PRECISION``), upserts are ``INSERT … ON CONFLICT … DO NOTHING`` (SQLite ≥ 3.24,
PostgreSQL ≥ 9.5), there is no ``INSERT OR IGNORE``, no two-argument ``max()``, no ``PRAGMA``
outside the SQLite subclass. A ``PostgresStore(dsn)`` is a subclass that overrides four hooks:

- ``_sql(query)``: rewrite the ``?`` placeholders to psycopg's ``%s``;
- ``_begin_write(cur, node)``: ``SELECT pg_advisory_xact_lock(hashtext(node))`` in the
  transaction psycopg opens, so the coverage read-merge-write of one node is serialized across
  daemons (SQLite gets the same from ``BEGIN IMMEDIATE``, which takes the database write lock);
- ``_commit(cur)`` / ``_rollback(cur)``: ``connection.commit()`` / ``connection.rollback()``;

and may declare ``records.body`` as ``JSONB`` (the store writes JSON text, which ``JSONB``
accepts). Several daemons of one share group must write to **one** store: the hwm of a node
is computed over the records every daemon stored.

Durability: :class:`SqliteStore` runs WAL with ``synchronous=FULL``: the daemon acknowledges
after the commit and the edge deletes what was acknowledged, so a committed transaction must
survive a power cut.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edgeglm.errors import DataError, ProtocolError
from edgeglm.protocol import Envelope, Kind, check_node_name, msg_id

__all__ = [
    "ALARM_CLEARED",
    "ALARM_RAISED",
    "AlarmInfo",
    "NodeInfo",
    "NodeStatus",
    "PutResult",
    "SqlStore",
    "SqliteStore",
    "Store",
    "StoreCounts",
    "StoredRecord",
    "gap_ranges",
]

SCHEMA_VERSION = 1
_MAX_INT = 2**63 - 1  # BIGINT
#: ``event`` of an ALARM record body that raises / clears the alarm of its ``stream``.
ALARM_RAISED = "alarm_raised"
ALARM_CLEARED = "alarm_cleared"
T = TypeVar("T")


class NodeStatus(str, Enum):
    """A node's connection state from its retained ``status`` topic.

    The agent publishes ``online`` on connect and ``stopped`` on a clean shutdown; the broker
    publishes its last will ``offline`` when the connection is lost. ``unknown``: never heard.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PutResult:
    """What one :meth:`Store.put_envelope` did.

    Args:
        new: records stored by this call.
        duplicate: records already stored (retransmissions), not stored again.
        covered_hwm: the incarnation's high-water mark after this call (what to acknowledge).
    """

    new: int
    duplicate: int
    covered_hwm: int


@dataclass(frozen=True)
class NodeInfo:
    """One row of the fleet view (``edgeglm cloud nodes``); times are epoch seconds, ``None`` if never.

    ``inc``/``boot``/``hwm`` are of the incarnation last heard from; ``model`` is the latest
    ``"name:version"`` of a HEALTH or PREDICTIONS body, ``backlog`` the latest HEALTH ``backlog``
    (records waiting in the node's outbox), ``records``/``duplicates`` totals since first seen.
    """

    node: str
    status: NodeStatus
    status_t: float | None
    first_seen: float | None
    last_seen: float | None
    inc: int | None
    boot: int | None
    hwm: int
    model: str | None
    backlog: int | None
    records: int
    duplicates: int
    active_alarms: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "status": self.status.value,
            "status_t": self.status_t,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "inc": self.inc,
            "boot": self.boot,
            "hwm": self.hwm,
            "model": self.model,
            "backlog": self.backlog,
            "records": self.records,
            "duplicates": self.duplicates,
            "active_alarms": self.active_alarms,
        }


@dataclass(frozen=True)
class AlarmInfo:
    """One ALARM record. ``active``: it is its stream's latest alarm record and it raised the alarm."""

    node: str
    stream: str
    event: str
    t: float
    rul: float | None
    msg_id: str
    active: bool
    body: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "stream": self.stream,
            "event": self.event,
            "t": self.t,
            "rul": self.rul,
            "msg_id": self.msg_id,
            "active": self.active,
            "body": self.body,
        }


@dataclass(frozen=True)
class StoredRecord:
    """A record as the store holds it (``received_at``: when the cloud stored it, epoch seconds)."""

    node: str
    msg_id: str
    inc: int
    seq: int
    kind: Kind
    t: float
    body: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class StoreCounts:
    """Totals over the whole store."""

    nodes: int
    records: int
    duplicates: int
    active_alarms: int
    by_kind: dict[str, int]


class Store(Protocol):
    """What the cloud daemon and the fleet commands need from a store (SQLite, PostgreSQL, …)."""

    def put_envelope(self, envelope: Envelope, received_at: float) -> PutResult:
        """Store the envelope's records idempotently in one transaction; return the new hwm.

        Raises:
            ProtocolError: a record cannot be stored as sent (bad GAP ranges, a body that is not
                JSON-representable, a non-finite time); nothing of the envelope is stored.
        """
        ...

    def high_water(self, node: str, inc: int) -> int: ...

    def coverage(self, node: str, inc: int) -> list[tuple[int, int]]: ...

    def nodes(self) -> list[NodeInfo]: ...

    def alarms(self, node: str | None = None, active_only: bool = False) -> list[AlarmInfo]: ...

    def records(self, node: str, kind: Kind | None = None, limit: int | None = None) -> list[StoredRecord]: ...

    def counts(self) -> StoreCounts: ...

    def set_node_status(self, node: str, status: NodeStatus, t: float) -> None: ...

    def close(self) -> None: ...


def gap_ranges(seq: int, body: dict[str, Any]) -> list[tuple[int, int]]:
    """The seq ranges a GAP record at ``seq`` declares dropped, validated (``1 ≤ a ≤ b < seq``).

    Raises:
        ProtocolError: ``ranges`` is missing or malformed, or a range is outside ``1..seq-1``.
    """
    ranges = body.get("ranges")
    if not isinstance(ranges, list) or not ranges:
        raise ProtocolError(f"gap record seq {seq}: 'ranges' must be a non-empty list of [first, last]")
    out = []
    for r in ranges:
        ok = isinstance(r, (list, tuple)) and len(r) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
        if not ok or not 1 <= r[0] <= r[1] < seq:
            raise ProtocolError(
                f"gap record seq {seq}: range {r!r} is not [first, last] with 1 ≤ first ≤ last < {seq}",
                hint="a gap names seqs the outbox dropped before it wrote the gap record",
            )
        out.append((r[0], r[1]))
    return out


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent intervals covering the same seqs."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def _json_safe(x: Any, where: str) -> Any:
    """A copy that ``json.dumps(allow_nan=False)`` accepts: NaN/±inf become ``null``; other types are refused."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise ProtocolError(f"{where}: body map keys must be strings")
        return {k: _json_safe(v, where) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, where) for v in x]
    raise ProtocolError(
        f"{where}: a {type(x).__name__} in the body cannot be stored as JSON",
        hint="bodies hold numbers, text, booleans, null, maps and lists",
    )


@dataclass(frozen=True)
class _Row:
    seq: int
    kind: Kind
    t: float
    body: dict[str, Any]
    body_json: str
    gaps: tuple[tuple[int, int], ...]


def _prepare(envelope: Envelope) -> list[_Row]:
    """Validate what the schema check of :class:`Envelope` leaves to the store; nothing is written yet."""
    if envelope.inc > _MAX_INT or envelope.boot > _MAX_INT:
        raise ProtocolError(f"envelope inc/boot beyond 2**63 - 1: {envelope.inc}, {envelope.boot}")
    rows = []
    for r in envelope.records:
        where = f"record seq {r.seq} ({r.kind.value}) of {envelope.node}"
        if r.seq > _MAX_INT:
            raise ProtocolError(f"{where}: seq beyond 2**63 - 1")
        if not math.isfinite(r.t):
            raise ProtocolError(f"{where}: t = {r.t} is not a finite time")
        body = _json_safe(r.body, where)
        gaps = tuple(gap_ranges(r.seq, body)) if r.kind is Kind.GAP else ()
        rows.append(_Row(r.seq, r.kind, r.t, body, json.dumps(body, separators=(",", ":"), allow_nan=False), gaps))
    return rows


_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS records ("
    " node TEXT NOT NULL, msg_id TEXT NOT NULL, inc BIGINT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL,"
    " t DOUBLE PRECISION NOT NULL, body TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL,"
    " PRIMARY KEY (node, msg_id))",
    "CREATE INDEX IF NOT EXISTS records_by_kind ON records (node, kind, t)",
    "CREATE TABLE IF NOT EXISTS coverage ("
    " node TEXT NOT NULL, inc BIGINT NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL, PRIMARY KEY (node, inc, lo))",
    "CREATE TABLE IF NOT EXISTS incarnations ("
    " node TEXT NOT NULL, inc BIGINT NOT NULL, hwm BIGINT NOT NULL, boot BIGINT NOT NULL,"
    " first_seen DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL, PRIMARY KEY (node, inc))",
    "CREATE TABLE IF NOT EXISTS nodes ("
    " node TEXT PRIMARY KEY, first_seen DOUBLE PRECISION, last_seen DOUBLE PRECISION, last_inc BIGINT,"
    " last_boot BIGINT, model TEXT, model_t DOUBLE PRECISION, backlog BIGINT, backlog_t DOUBLE PRECISION,"
    " status TEXT, status_t DOUBLE PRECISION, records BIGINT NOT NULL, duplicates BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS alarm_state ("
    " node TEXT NOT NULL, stream TEXT NOT NULL, msg_id TEXT NOT NULL, t DOUBLE PRECISION NOT NULL,"
    " seq BIGINT NOT NULL, active BIGINT NOT NULL, PRIMARY KEY (node, stream))",
)

_NODE_COLS = (
    "first_seen",
    "last_seen",
    "last_inc",
    "last_boot",
    "model",
    "model_t",
    "backlog",
    "backlog_t",
    "status",
    "status_t",
    "records",
    "duplicates",
)
_NEW_NODE = {c: None for c in _NODE_COLS} | {"records": 0, "duplicates": 0}


class SqlStore:
    """The :class:`Store` in portable SQL over a DB-API 2 connection; subclasses supply the engine.

    Subclasses implement :meth:`_begin_write`, :meth:`_commit`, :meth:`_rollback` and, when the
    driver's placeholder is not ``?``, :meth:`_sql` (see the module docstring). The connection
    is used under a lock, so one store may be shared by the daemon's network thread and readers.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._init_schema()

    # -- engine hooks ---------------------------------------------------------------------------
    def _sql(self, query: str) -> str:
        """The query in the driver's placeholder style (written with ``?``)."""
        return query

    def _begin_write(self, cur: Any, node: str) -> None:
        """Open a write transaction that serializes writers of ``node`` (or of the whole store)."""
        raise NotImplementedError

    def _commit(self, cur: Any) -> None:
        raise NotImplementedError

    def _rollback(self, cur: Any) -> None:
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------
    def _x(self, cur: Any, query: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(query), tuple(params))
        return cur

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            cur = self._conn.cursor()
            try:
                return list(self._x(cur, query, params).fetchall())
            finally:
                cur.close()

    def _write(self, node: str, fn: Callable[[Any], T]) -> T:
        with self._lock:
            cur = self._conn.cursor()
            try:
                self._begin_write(cur, node)
                try:
                    result = fn(cur)
                    self._commit(cur)
                except BaseException:
                    self._rollback(cur)
                    raise
                return result
            finally:
                cur.close()

    def _init_schema(self) -> None:
        def create(cur: Any) -> None:
            for stmt in _DDL:
                self._x(cur, stmt)
            row = self._x(cur, "SELECT value FROM meta WHERE key = ?", ("schema_version",)).fetchone()
            if row is None:
                self._x(cur, "INSERT INTO meta (key, value) VALUES (?, ?)", ("schema_version", str(SCHEMA_VERSION)))
            elif row[0] != str(SCHEMA_VERSION):
                raise DataError(
                    f"the cloud store is schema version {row[0]}; this EdgeGLM reads version {SCHEMA_VERSION}",
                    hint="run the EdgeGLM version that wrote this store, or point the daemon at a new one",
                )

        self._write("", create)

    # -- writes ---------------------------------------------------------------------------------
    def put_envelope(self, envelope: Envelope, received_at: float) -> PutResult:
        """Store the envelope's records in one transaction; see :class:`Store`."""
        rows = _prepare(envelope)  # validates everything before anything is written
        return self._write(envelope.node, lambda cur: self._put(cur, envelope, rows, received_at))

    def _put(self, cur: Any, env: Envelope, rows: list[_Row], received_at: float) -> PutResult:
        node, inc = env.node, env.inc
        new_rows = []
        for r in rows:
            self._x(
                cur,
                "INSERT INTO records (node, msg_id, inc, seq, kind, t, body, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, msg_id) DO NOTHING",
                (node, msg_id(inc, r.seq), inc, r.seq, r.kind.value, r.t, r.body_json, received_at),
            )
            if cur.rowcount == 1:
                new_rows.append(r)
        dup = len(rows) - len(new_rows)
        hwm = self._cover(cur, node, inc, [(r.seq, r.seq) for r in rows] + [g for r in rows for g in r.gaps])
        got = self._x(cur, "SELECT boot FROM incarnations WHERE node = ? AND inc = ?", (node, inc)).fetchone()
        if got is None:
            self._x(
                cur,
                "INSERT INTO incarnations (node, inc, hwm, boot, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                (node, inc, hwm, env.boot, received_at, received_at),
            )
        else:
            self._x(
                cur,
                "UPDATE incarnations SET hwm = ?, boot = ?, last_seen = ? WHERE node = ? AND inc = ?",
                (hwm, max(int(got[0]), env.boot), received_at, node, inc),
            )
        self._update_node(cur, env, new_rows, dup, received_at)
        for r in new_rows:
            if r.kind is Kind.ALARM:
                self._update_alarm(cur, node, inc, r)
        return PutResult(len(new_rows), dup, hwm)

    def _cover(self, cur: Any, node: str, inc: int, intervals: list[tuple[int, int]]) -> int:
        """Merge intervals into the persisted coverage of ``(node, inc)``; return the hwm."""
        for lo, hi in _merge(intervals):
            where = "FROM coverage WHERE node = ? AND inc = ? AND hi >= ? AND lo <= ?"
            args = (node, inc, lo - 1, hi + 1)  # overlapping or adjacent intervals
            touching = self._x(cur, f"SELECT lo, hi {where}", args).fetchall()
            if len(touching) == 1 and touching[0][0] <= lo and touching[0][1] >= hi:
                continue  # already covered (a retransmission)
            new_lo = min([lo, *(int(t[0]) for t in touching)])
            new_hi = max([hi, *(int(t[1]) for t in touching)])
            self._x(cur, f"DELETE {where}", args)
            self._x(cur, "INSERT INTO coverage (node, inc, lo, hi) VALUES (?, ?, ?, ?)", (node, inc, new_lo, new_hi))
        row = self._x(cur, "SELECT hi FROM coverage WHERE node = ? AND inc = ? AND lo = 1", (node, inc)).fetchone()
        return int(row[0]) if row else 0

    def _load_node(self, cur: Any, node: str) -> dict[str, Any] | None:
        row = self._x(cur, f"SELECT {', '.join(_NODE_COLS)} FROM nodes WHERE node = ?", (node,)).fetchone()
        return None if row is None else dict(zip(_NODE_COLS, row, strict=True))

    def _save_node(self, cur: Any, node: str, values: dict[str, Any], *, exists: bool) -> None:
        vals = [values[c] for c in _NODE_COLS]
        if exists:
            sets = ", ".join(f"{c} = ?" for c in _NODE_COLS)
            self._x(cur, f"UPDATE nodes SET {sets} WHERE node = ?", (*vals, node))
        else:
            marks = ", ".join("?" for _ in range(len(_NODE_COLS) + 1))
            self._x(cur, f"INSERT INTO nodes (node, {', '.join(_NODE_COLS)}) VALUES ({marks})", (node, *vals))

    def _update_node(self, cur: Any, env: Envelope, new_rows: list[_Row], dup: int, received_at: float) -> None:
        old = self._load_node(cur, env.node)
        n = dict(old or _NEW_NODE)
        if n["last_seen"] is None or received_at >= n["last_seen"]:
            n.update(last_seen=received_at, last_inc=env.inc, last_boot=env.boot)
        n["first_seen"] = received_at if n["first_seen"] is None else min(n["first_seen"], received_at)
        for r in new_rows:  # the newest (by record time) wins, whatever order records arrive in
            model, backlog = r.body.get("model"), r.body.get("backlog")
            model_ok = r.kind in (Kind.HEALTH, Kind.PREDICTIONS) and isinstance(model, str)
            if model_ok and (n["model_t"] is None or r.t >= n["model_t"]):
                n.update(model=model, model_t=r.t)
            backlog_ok = r.kind is Kind.HEALTH and type(backlog) is int and 0 <= backlog <= _MAX_INT
            if backlog_ok and (n["backlog_t"] is None or r.t >= n["backlog_t"]):
                n.update(backlog=backlog, backlog_t=r.t)
        n["records"] = int(n["records"]) + len(new_rows)
        n["duplicates"] = int(n["duplicates"]) + dup
        self._save_node(cur, env.node, n, exists=old is not None)

    def _update_alarm(self, cur: Any, node: str, inc: int, r: _Row) -> None:
        event = r.body.get("event")
        if event not in (ALARM_RAISED, ALARM_CLEARED):
            return  # kept in the history, but it does not change the alarm state
        stream = str(r.body.get("stream", ""))
        got = self._x(cur, "SELECT t, seq FROM alarm_state WHERE node = ? AND stream = ?", (node, stream)).fetchone()
        values = (msg_id(inc, r.seq), r.t, r.seq, 1 if event == ALARM_RAISED else 0)
        if got is None:
            self._x(
                cur,
                "INSERT INTO alarm_state (node, stream, msg_id, t, seq, active) VALUES (?, ?, ?, ?, ?, ?)",
                (node, stream, *values),
            )
        elif (r.t, r.seq) >= (float(got[0]), int(got[1])):  # a late retransmission never overrides a newer state
            self._x(
                cur,
                "UPDATE alarm_state SET msg_id = ?, t = ?, seq = ?, active = ? WHERE node = ? AND stream = ?",
                (*values, node, stream),
            )

    def set_node_status(self, node: str, status: NodeStatus, t: float) -> None:
        """Record the node's connection state at ``t`` (a status older than the stored one is ignored)."""
        check_node_name(node)
        status = NodeStatus(status)

        def save(cur: Any) -> None:
            old = self._load_node(cur, node)
            n = dict(old or _NEW_NODE)
            if n["status_t"] is not None and t < n["status_t"]:
                return
            n.update(status=status.value, status_t=t)
            self._save_node(cur, node, n, exists=old is not None)

        self._write(node, save)

    # -- reads ----------------------------------------------------------------------------------
    def high_water(self, node: str, inc: int) -> int:
        rows = self._read("SELECT hi FROM coverage WHERE node = ? AND inc = ? AND lo = 1", (node, inc))
        return int(rows[0][0]) if rows else 0

    def coverage(self, node: str, inc: int) -> list[tuple[int, int]]:
        """The covered seq intervals ``[(lo, hi), …]`` of ``(node, inc)``, sorted."""
        rows = self._read("SELECT lo, hi FROM coverage WHERE node = ? AND inc = ? ORDER BY lo", (node, inc))
        return [(int(a), int(b)) for a, b in rows]

    def nodes(self) -> list[NodeInfo]:
        rows = self._read(
            "SELECT n.node, n.status, n.status_t, n.first_seen, n.last_seen, n.last_inc, n.last_boot,"
            " COALESCE(i.hwm, 0), n.model, n.backlog, n.records, n.duplicates,"
            " (SELECT COUNT(*) FROM alarm_state a WHERE a.node = n.node AND a.active = 1)"
            " FROM nodes n LEFT JOIN incarnations i ON i.node = n.node AND i.inc = n.last_inc ORDER BY n.node"
        )
        return [
            NodeInfo(
                node=r[0],
                status=NodeStatus(r[1] or NodeStatus.UNKNOWN.value),
                status_t=r[2],
                first_seen=r[3],
                last_seen=r[4],
                inc=r[5],
                boot=r[6],
                hwm=int(r[7]),
                model=r[8],
                backlog=r[9],
                records=int(r[10]),
                duplicates=int(r[11]),
                active_alarms=int(r[12]),
            )
            for r in rows
        ]

    def alarms(self, node: str | None = None, active_only: bool = False) -> list[AlarmInfo]:
        """ALARM records, newest first; ``active_only``: the raising record of each stream still in alarm."""
        q = (
            "SELECT r.node, r.msg_id, r.t, r.body, COALESCE(s.active, 0) FROM records r"
            " LEFT JOIN alarm_state s ON s.node = r.node AND s.msg_id = r.msg_id WHERE r.kind = ?"
        )
        args: list[Any] = [Kind.ALARM.value]
        if node is not None:
            q += " AND r.node = ?"
            args.append(node)
        if active_only:
            q += " AND s.active = 1"
        out = []
        for n, mid, t, body_json, active in self._read(q + " ORDER BY r.t DESC, r.node, r.seq DESC", args):
            body = json.loads(body_json)
            rul = body.get("rul")
            has_rul = isinstance(rul, (int, float)) and not isinstance(rul, bool)
            out.append(
                AlarmInfo(
                    node=n,
                    stream=str(body.get("stream", "")),
                    event=str(body.get("event", "")),
                    t=float(t),
                    rul=float(rul) if has_rul else None,
                    msg_id=mid,
                    active=bool(active),
                    body=body,
                )
            )
        return out

    def records(self, node: str, kind: Kind | None = None, limit: int | None = None) -> list[StoredRecord]:
        """The node's records in arrival order (then inc, seq); at most ``limit``."""
        q = "SELECT node, msg_id, inc, seq, kind, t, body, received_at FROM records WHERE node = ?"
        args: list[Any] = [node]
        if kind is not None:
            q += " AND kind = ?"
            args.append(Kind(kind).value)
        q += " ORDER BY received_at, inc, seq"
        if limit is not None:
            q += " LIMIT ?"
            args.append(int(limit))
        return [
            StoredRecord(n, m, int(i), int(s), Kind(k), float(t), json.loads(b), float(ra))
            for n, m, i, s, k, t, b, ra in self._read(q, args)
        ]

    def counts(self) -> StoreCounts:
        nodes, dups = self._read("SELECT COUNT(*), COALESCE(SUM(duplicates), 0) FROM nodes")[0]
        by_kind = {k: int(n) for k, n in self._read("SELECT kind, COUNT(*) FROM records GROUP BY kind")}
        (active,) = self._read("SELECT COUNT(*) FROM alarm_state WHERE active = 1")[0]
        return StoreCounts(int(nodes), sum(by_kind.values()), int(dups), int(active), by_kind)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SqliteStore(SqlStore):
    """:class:`SqlStore` on a SQLite file in WAL mode (``synchronous=FULL``, 10 s busy timeout).

    Several daemons (threads or processes on one host) may share the file: each envelope's
    transaction starts with ``BEGIN IMMEDIATE``, which serializes the writers.

    Args:
        path: the database file.
        create: create the file if it does not exist (default: True); with False a missing
            file is a :class:`DataError` (the fleet commands read, they never create).

    Raises:
        DataError: the file is missing (``create=False``), not SQLite, or of another schema version.

    Example::

        with SqliteStore("cloud.db") as store:
            result = store.put_envelope(envelope, received_at=time.time())
            print(result.covered_hwm)
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(
                f"no cloud store at {self.path}",
                hint="pass the daemon's store file (--store cloud.db) or its config (--config cloud.toml)",
            )
        conn = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            super().__init__(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise DataError(f"{self.path} is not a usable SQLite database: {exc}", hint="check the path") from exc
        except BaseException:
            conn.close()
            raise

    def _begin_write(self, cur: Any, node: str) -> None:
        cur.execute("BEGIN IMMEDIATE")

    def _commit(self, cur: Any) -> None:
        cur.execute("COMMIT")

    def _rollback(self, cur: Any) -> None:
        cur.execute("ROLLBACK")
