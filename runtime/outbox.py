"""The edge's durable store-and-forward: every record is on disk before it is published.

One SQLite database (WAL mode) per node holds every record the agent produces (prediction
summaries, alarms, sensor faults, health, gaps) until the cloud acknowledges it::

    append ─► records (seq 1, 2, 3 …, durable) ─► pending() ─► publish (QoS1) ─► cloud stores
                  ▲                                                                  │
                  └───────── ack(inc, seq): delete every record with seq ≤ seq ◄──────┘

Identity. ``inc`` (incarnation) is a random 63-bit id chosen when the database is created;
``boot`` counts the opens of the database; ``seq`` counts 1, 2, 3 … and never resets while the
database exists (a wiped outbox is a new incarnation). ``(node, inc, seq)`` names a record, and
:func:`~edgeglm.protocol.msg_id` ``(inc, seq)`` is its message id, the same on every retransmission.

Durability. One transaction per :meth:`Outbox.append` / :meth:`Outbox.append_many` / :meth:`Outbox.ack`
/ bound-enforcement pass; the seq counter, ``inc``/``boot`` and the counters live in the one-row
``meta`` table and change in the same transaction as the records. With ``synchronous=FULL`` (the
default) SQLite fsyncs the WAL at every commit, so a record whose ``append`` returned survives a
power cut; with ``NORMAL`` it survives a process crash (kill -9) but the last commits may roll
back on a power cut. A lock file (``<path>.lock``, ``flock``) keeps a second process off the
database: two writers would hand out the same seqs.

Delivery. A record is deleted only by :meth:`Outbox.ack`, i.e. when the cloud's application-level
:class:`~edgeglm.protocol.Ack` says every record up to ``seq`` of this incarnation is stored or
covered by a gap (a broker PUBACK only means the broker has it). The sender keeps a bounded
in-flight window: it publishes ``pending(after_seq=highest_published)``; on reconnect (or when
acks stall) it replays from ``pending(after_seq=acked_seq)``. Retransmissions are harmless: the
cloud stores each ``(node, msg_id)`` once.

Bounds. The stored bytes (the records' JSON body sizes) are bounded by ``max_bytes`` and the
records' age by ``max_age_s``. When an append would take the store past ``max_bytes``:

1. **Thinning.** The oldest not-yet-thinned PREDICTIONS records are rewritten in place, keeping
   rows ``0, n, 2n, …`` (every ``n = thin_keep_every``-th row) and setting ``body["thinned"]``
   to the number of rows dropped (``len(rows) + thinned`` is the original row count). The seq,
   kind and ``t`` stay, so there is no seq hole; each record is thinned at most once. Thinning
   goes on, oldest first, until the store is at ``low_water × max_bytes`` (room for the new
   records included) or no thinnable record is left.
2. **Eviction.** If the store is still over ``max_bytes``, whole records are deleted oldest first
   (PREDICTIONS, FAULT, HEALTH; never ALARM, never GAP) down to the low-water mark, and the same
   transaction appends ONE gap record (kind GAP, its own new seq) per pass::

       {"ranges": [[first_seq, last_seq], …], "count": n_records, "rows": n_prediction_rows_lost,
        "reason": "bytes-bound" | "age-bound", "kinds": {"predictions": …, …}, "bytes": n_bytes}

   ``ranges`` are maximal runs of consecutive evicted seqs, sorted; their lengths add up to
   ``count`` exactly (kept alarms split runs). A pass lists at most ``MAX_GAP_RANGES`` ranges;
   more eviction takes another pass (another gap record).

Records older than ``max_age_s`` (by their ``t``, against the clock) are evicted the same way
with reason ``age-bound``, without thinning; the age check runs at open, at most every
``min(60 s, max_age_s / 10)`` during appends, and on :meth:`Outbox.enforce_bounds`. Alarms and
gap records are never evicted, so a store holding only those may stay over ``max_bytes``.

How the cloud treats these. A gap record's seqs count as *covered*: the cloud acknowledges past
them once it has the gap record (whose seq is larger than every seq it covers). Eviction and
thinning may hit records already published but not yet acknowledged (in flight), so a gap range
may overlap records the cloud has stored, and the cloud may hold the full or the thinned version
of a record: both are fine — a stored record wins over a gap range covering its seq, and the first
stored version of a ``msg_id`` is kept. Either way the seq is covered.

Accounting. ``last_seq = records stored + acked_records + evicted_records`` at every commit
(gap records are records too); :meth:`Outbox.stats` reports these, the thinned rows, the recent
append rate and how many hours of outage the byte bound covers at that rate.

Clock. ``t`` and the age bound use the wall clock (``clock``, default :func:`time.time`). A
node without a real-time clock that appends before its time is synced stamps records in the
past; once the clock jumps they look old and the age bound evicts them, so such an agent should
wait for time sync (or pass ``t``) before appending.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from edgeglm.atomic import fsync_dir
from edgeglm.errors import ConfigError, DataError, ProtocolError
from edgeglm.protocol import MAX_PAYLOAD_BYTES, Envelope, Kind, Record, check_node_name

__all__ = ["MAX_BODY_BYTES", "MAX_GAP_RANGES", "SCHEMA_VERSION", "GapReason", "Outbox", "OutboxConfig", "OutboxStats"]

#: Version of the database layout; another version is refused (never guessed at).
SCHEMA_VERSION = 1
#: Largest record body (JSON bytes): it must fit one envelope, or it would block the ack stream forever.
MAX_BODY_BYTES = MAX_PAYLOAD_BYTES - 4096
#: Most seq ranges one gap record lists; a bigger eviction writes more gap records.
MAX_GAP_RANGES = 1000
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_KINDS = {k.value: k for k in Kind}
_EVICTABLE = tuple(k.value for k in Kind if k.evictable)
_EVICTABLE_SQL = "kind IN ({})".format(", ".join("?" * len(_EVICTABLE)))
_BATCH = 256  # rows per SELECT while thinning / evicting
_RATE_WINDOW_S = 3600.0
_RATE_BUCKET_S = 60.0

_SCHEMA = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        schema_version INTEGER NOT NULL,
        node TEXT NOT NULL,
        inc INTEGER NOT NULL,
        boot INTEGER NOT NULL,
        created_t REAL NOT NULL,
        last_seq INTEGER NOT NULL,
        acked_seq INTEGER NOT NULL,
        acked_records INTEGER NOT NULL,
        evicted_records INTEGER NOT NULL,
        evicted_rows INTEGER NOT NULL,
        thinned_records INTEGER NOT NULL,
        thinned_rows INTEGER NOT NULL,
        gaps_written INTEGER NOT NULL
    )""",
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        t REAL NOT NULL,
        body TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        nrows INTEGER NOT NULL,
        thinned INTEGER NOT NULL DEFAULT 0
    )""",
)
#: The meta columns the outbox keeps in memory and writes back in every transaction.
_COUNTERS = (
    "boot",
    "last_seq",
    "acked_seq",
    "acked_records",
    "evicted_records",
    "evicted_rows",
    "thinned_records",
    "thinned_rows",
    "gaps_written",
)
_SAVE_META = "UPDATE meta SET {} WHERE id = 1".format(", ".join(f"{c} = ?" for c in _COUNTERS))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class GapReason(str, Enum):
    """Why records were evicted (the ``reason`` of a gap record)."""

    BYTES_BOUND = "bytes-bound"
    AGE_BOUND = "age-bound"


@dataclass(frozen=True)
class OutboxConfig:
    """Bounds and durability of the outbox.

    Args:
        max_bytes: bound on the stored record bytes (sum of the JSON body sizes; the database
            file is larger by SQLite's overhead). (default: 64 MiB)
        max_age_s: evictable records older than this are evicted (alarms and gaps never).
            (default: 7 days)
        thin_keep_every: thinning keeps every n-th row of old PREDICTIONS records; 1 turns
            thinning off (eviction only). (default: 2)
        synchronous: SQLite ``synchronous`` in WAL mode: ``FULL`` fsyncs every commit (survives
            power cuts), ``NORMAL`` survives process crashes only, ``OFF`` is for tests. ``EXTRA``
            also syncs the directory. (default: ``"FULL"``)
        low_water: once a bound is hit, thin / evict down to this fraction of ``max_bytes``, so
            passes (and gap records) are rare rather than one per append. (default: 0.9)

    Raises:
        ConfigError: a value is out of range; the message names the key.
    """

    max_bytes: int = 64 * 2**20
    max_age_s: float = 7 * 86400
    thin_keep_every: int = 2
    synchronous: str = "FULL"
    low_water: float = 0.9

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, want: str, hint: str) -> ConfigError:
            return ConfigError(f"outbox.{key} = {value!r}: {want}", hint=hint)

        if not _is_int(self.max_bytes) or self.max_bytes < 4096:
            raise bad("max_bytes", self.max_bytes, "must be an integer ≥ 4096", "e.g. 67108864 (64 MiB)")
        if not _is_number(self.max_age_s) or not self.max_age_s > 0:
            raise bad("max_age_s", self.max_age_s, "must be a positive number of seconds", "e.g. 604800 (7 days)")
        if not _is_int(self.thin_keep_every) or self.thin_keep_every < 1:
            raise bad(
                "thin_keep_every",
                self.thin_keep_every,
                "must be an integer ≥ 1",
                "2 keeps every 2nd row; 1 = no thinning",
            )
        if self.synchronous not in _SYNCHRONOUS:
            raise bad("synchronous", self.synchronous, f"must be one of {', '.join(_SYNCHRONOUS)}", "use FULL")
        if not _is_number(self.low_water) or not 0 < self.low_water <= 1:
            raise bad("low_water", self.low_water, "must be a fraction in (0, 1]", "e.g. 0.9")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> OutboxConfig:
        """Build from a TOML table; an unknown key is a :class:`ConfigError` listing the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown outbox key(s): {', '.join(unknown)}", hint=f"known keys: {', '.join(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class OutboxStats:
    """A snapshot of the outbox (:meth:`Outbox.stats`).

    ``last_seq == records + acked_records + evicted_records`` always holds. ``coverage_hours``
    is how long an outage the byte bound absorbs before thinning starts, at the recent append
    rate: ``max_bytes / bytes_per_hour``, capped by the age bound (the age bound alone when
    nothing was appended recently). ``headroom_hours`` is the same from the current fill.
    """

    records: int
    bytes: int
    by_kind: dict[str, int]
    oldest_t: float | None
    acked_seq: int
    last_seq: int
    acked_records: int
    evicted_records: int
    evicted_rows: int
    thinned_records: int
    thinned_rows: int
    gaps_written: int
    bytes_per_hour: float
    coverage_hours: float
    headroom_hours: float
    max_bytes: int
    inc: int
    boot: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Outbox:
    """A node's durable, bounded store-and-forward queue (see the module docstring for the protocol).

    Args:
        path: the SQLite database; created (with its parent folder) if missing.
        node: the node name (one topic level); a database created for another node is refused.
        config: bounds and durability. (default: :class:`OutboxConfig` ``()``)
        clock: wall-clock seconds, for ``t``, the age bound and the append rate. (default: ``time.time``)

    Raises:
        ConfigError: another process has the outbox open.
        DataError: the file is not an outbox database, is of another schema version, or of another node.

    Thread-safe (one lock); one process at a time.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        node: str,
        config: OutboxConfig = OutboxConfig(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.node = check_node_name(node)
        self.config = config
        self._clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self.inc = 0
        self._m: dict[str, int] = {}
        self._bytes = 0
        self._rate = _RateMeter()
        self._age_interval_s = min(60.0, config.max_age_s / 10)
        self._next_age_check = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock_file()
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0)
            self._open()
            self._enforce(self._clock(), 0)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- identity

    @property
    def acked_seq(self) -> int:
        """Every record with ``seq ≤ acked_seq`` is acknowledged (and deleted)."""
        return self._m["acked_seq"]

    @property
    def last_seq(self) -> int:
        """The seq of the newest record ever appended (0 for a new outbox)."""
        return self._m["last_seq"]

    @property
    def boot(self) -> int:
        """How many times this database has been opened, this open included."""
        return self._m["boot"]

    def envelope(self, records: Sequence[Record]) -> Envelope:
        """The :class:`Envelope` carrying ``records`` (from :meth:`pending`) for this node."""
        return Envelope(self.node, self.inc, self.boot, tuple(records))

    # ----------------------------------------------------------------- writing

    def append(self, kind: Kind, body: dict[str, Any], *, t: float | None = None) -> Record:
        """Store one record durably (committed before this returns) and return it with its seq.

        Args:
            kind: what the record carries.
            body: a JSON-able map (no NaN/inf), at most ``MAX_BODY_BYTES`` as JSON.
            t: the record's time in wall-clock seconds. (default: now)

        Raises:
            ProtocolError: the body is not JSON-able or too large (nothing is stored).
        """
        return self.append_many([(kind, body)], t=t)[0]

    def append_many(self, items: Sequence[tuple[Kind, dict[str, Any]]], *, t: float | None = None) -> list[Record]:
        """Store several records in ONE transaction (one fsync), consecutive seqs, all with the same ``t``.

        Bounds are enforced first (in their own transactions), so an exception leaves none of
        ``items`` stored and the call can be retried. The returned records share the caller's
        body dicts; :meth:`pending` returns them as decoded from the database.
        """
        prepared = [_prepare(kind, body) for kind, body in items]
        if not prepared:
            return []
        incoming = sum(p[2] for p in prepared)
        with self._lock:
            db = self._conn()
            now = self._clock()
            ts = now if t is None else float(t)
            self._enforce(now, incoming)
            first = self._m["last_seq"] + 1
            with self._transaction():
                db.executemany(
                    "INSERT INTO records (seq, kind, t, body, nbytes, nrows) VALUES (?, ?, ?, ?, ?, ?)",
                    [(first + i, k.value, ts, text, nb, nr) for i, (k, text, nb, nr) in enumerate(prepared)],
                )
                self._m["last_seq"] = first + len(prepared) - 1
                self._bytes += incoming
                self._save_meta()
            self._rate.add(now, incoming)
        return [Record(first + i, prepared[i][0], ts, items[i][1]) for i in range(len(prepared))]

    def ack(self, inc: int, seq: int) -> int:
        """The cloud has every record of incarnation ``inc`` up to ``seq``: delete them.

        Returns:
            how many records were deleted; 0 for an ack of another incarnation or of a seq
            not above :attr:`acked_seq`. A seq above :attr:`last_seq` is clamped to it.
        """
        with self._lock:
            db = self._conn()
            if inc != self.inc or seq <= self._m["acked_seq"]:
                return 0
            seq = min(seq, self._m["last_seq"])
            if seq <= self._m["acked_seq"]:
                return 0
            with self._transaction():
                n, nbytes = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM records WHERE seq <= ?", (seq,)
                ).fetchone()
                db.execute("DELETE FROM records WHERE seq <= ?", (seq,))
                self._m["acked_seq"] = seq
                self._m["acked_records"] += n
                self._bytes -= nbytes
                self._save_meta()
            return n

    def enforce_bounds(self) -> list[Record]:
        """Apply the age and byte bounds now (they are also applied on open and on append).

        Returns:
            the gap records written (empty if nothing was evicted).
        """
        with self._lock:
            self._conn()
            self._next_age_check = float("-inf")
            return self._enforce(self._clock(), 0)

    # ----------------------------------------------------------------- reading

    def pending(
        self, *, after_seq: int = 0, limit: int = 256, max_bytes: int = 200_000, kinds: Sequence[Kind] | None = None
    ) -> list[Record]:
        """Unacknowledged records with ``seq > after_seq``, oldest first (only ``kinds`` if given).

        At most ``limit`` records, and stops before the body bytes would pass ``max_bytes``
        (always at least one record if there is one). The agent sends pending GAP records
        ahead of the stream (``kinds=(Kind.GAP,)``): a gap covers seqs *below* its own, and
        the cloud's high-water mark cannot pass an evicted seq until it has the gap.
        """
        where, params = "seq > ?", [max(after_seq, self._m["acked_seq"])]
        if kinds:
            where += " AND kind IN ({})".format(", ".join("?" * len(kinds)))
            params += [k.value for k in kinds]
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    f"SELECT seq, kind, t, body, nbytes FROM records WHERE {where} ORDER BY seq LIMIT ?",
                    (*params, max(limit, 1)),
                )
                .fetchall()
            )
        out: list[Record] = []
        total = 0
        for seq, kind, t, body, nbytes in rows:
            if out and total + nbytes > max_bytes:
                break
            out.append(Record(seq, _KINDS[kind], t, json.loads(body)))
            total += nbytes
        return out

    def stats(self) -> OutboxStats:
        """Counts, bytes, the recent append rate and the outage the bound covers (see :class:`OutboxStats`)."""
        with self._lock:
            db = self._conn()
            by_kind = dict(db.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall())
            oldest_t = db.execute("SELECT MIN(t) FROM records").fetchone()[0]
            now = self._clock()
            rate = self._rate.per_hour(now)
            age_h = self.config.max_age_s / 3600
            if rate > 0:
                coverage = min(self.config.max_bytes / rate, age_h)
                headroom = min(max(self.config.max_bytes - self._bytes, 0) / rate, age_h)
            else:
                coverage = headroom = age_h
            m = self._m
            return OutboxStats(
                records=sum(by_kind.values()),
                bytes=self._bytes,
                by_kind=by_kind,
                oldest_t=oldest_t,
                acked_seq=m["acked_seq"],
                last_seq=m["last_seq"],
                acked_records=m["acked_records"],
                evicted_records=m["evicted_records"],
                evicted_rows=m["evicted_rows"],
                thinned_records=m["thinned_records"],
                thinned_rows=m["thinned_rows"],
                gaps_written=m["gaps_written"],
                bytes_per_hour=rate,
                coverage_hours=coverage,
                headroom_hours=headroom,
                max_bytes=self.config.max_bytes,
                inc=self.inc,
                boot=m["boot"],
            )

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the database and release the lock file (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _lock_file(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"outbox {self.path} is already open (lock {lock_path} held by pid {holder})",
                hint="stop the other agent of this node, or give this one another outbox path",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ValueError(f"outbox {self.path} is closed")
        return self._db

    def _open(self) -> None:
        db = self._conn()
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise DataError(
                f"{self.path} is not an outbox database: {exc}",
                hint="move the file away; a new outbox (new incarnation) is created in its place",
            ) from exc
        if mode.lower() != "wal":
            raise DataError(f"{self.path}: SQLite refused WAL mode (journal_mode={mode})", hint="use a local disk")
        db.execute(f"PRAGMA synchronous = {self.config.synchronous}")
        db.execute("PRAGMA journal_size_limit = 8388608")
        created = False
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute(
                    "INSERT INTO meta VALUES (1, ?, ?, ?, 0, ?, 0, 0, 0, 0, 0, 0, 0, 0)",
                    (SCHEMA_VERSION, self.node, secrets.randbits(63) or 1, self._clock()),
                )
                created = True
            cols = ("schema_version", "node", "inc", *_COUNTERS)
            row = db.execute(f"SELECT {', '.join(cols)} FROM meta WHERE id = 1").fetchone()
            if row is None:
                raise DataError(f"{self.path}: outbox meta row missing", hint="move the file away to start afresh")
            meta = dict(zip(cols, row, strict=True))
            if meta["schema_version"] != SCHEMA_VERSION:
                raise DataError(
                    f"{self.path} is outbox schema v{meta['schema_version']}; this agent reads v{SCHEMA_VERSION}",
                    hint="run the agent version that wrote it until it drains, or move the file away",
                )
            if meta["node"] != self.node:
                raise DataError(
                    f"{self.path} is the outbox of node {meta['node']!r}, not {self.node!r}",
                    hint="each node needs its own outbox path",
                )
            self.inc = int(meta["inc"])
            self._m = {c: int(meta[c]) for c in _COUNTERS}
            self._m["boot"] += 1
            self._save_meta()
            self._bytes = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM records").fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        if created:
            fsync_dir(self.path.parent)

    def _reload(self) -> None:
        """After a failed transaction: the in-memory counters back from the database."""
        db = self._conn()
        row = db.execute(f"SELECT {', '.join(_COUNTERS)} FROM meta WHERE id = 1").fetchone()
        self._m = dict(zip(_COUNTERS, (int(x) for x in row), strict=True))
        self._bytes = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM records").fetchone()[0]

    def _save_meta(self) -> None:
        self._conn().execute(_SAVE_META, [self._m[c] for c in _COUNTERS])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT; on any failure roll back and reload the in-memory state."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self._reload()
            raise

    def _enforce(self, now: float, incoming: int) -> list[Record]:
        """Age bound (when due), then make room for ``incoming`` bytes under the byte bound."""
        gaps: list[Record] = []
        if now >= self._next_age_check or now < self._next_age_check - 2 * self._age_interval_s:
            self._next_age_check = now + self._age_interval_s
            cutoff = now - self.config.max_age_s
            while (gap := self._evict_pass(GapReason.AGE_BOUND, now, older_than=cutoff)) is not None:
                gaps.append(gap)
        cfg = self.config
        if self._bytes + incoming > cfg.max_bytes:
            target = max(int(cfg.max_bytes * cfg.low_water) - incoming, 0)
            if cfg.thin_keep_every > 1:
                self._thin(target)
            while self._bytes + incoming > cfg.max_bytes:
                gap = self._evict_pass(GapReason.BYTES_BOUND, now, until_bytes=target)
                if gap is None:
                    break  # only alarms and gaps left: they stay, over the bound
                gaps.append(gap)
        return gaps

    def _thin(self, target: int) -> None:
        """Thin the oldest unthinned PREDICTIONS records until the store is at ``target`` bytes (one transaction)."""
        db = self._conn()
        k = self.config.thin_keep_every
        cursor = 0
        changed = False
        with self._transaction():
            while self._bytes > target:
                batch = db.execute(
                    "SELECT seq, body, nbytes FROM records WHERE seq > ? AND kind = ? AND thinned = 0"
                    " ORDER BY seq LIMIT ?",
                    (cursor, Kind.PREDICTIONS.value, _BATCH),
                ).fetchall()
                if not batch:
                    break
                rewritten, skipped = [], []
                for seq, text, nbytes in batch:
                    if self._bytes <= target:
                        break
                    cursor = seq
                    body = json.loads(text)
                    rows = body.get("rows")
                    if not isinstance(rows, list) or len(rows) < 2:
                        skipped.append((seq,))  # nothing to gain; never look at it again
                        continue
                    kept = rows[::k]
                    dropped = len(rows) - len(kept)
                    before = body.get("thinned", 0)
                    body["rows"] = kept
                    body["thinned"] = (before if _is_int(before) else 0) + dropped
                    new = json.dumps(body, separators=(",", ":"), allow_nan=False)
                    rewritten.append((new, len(new), len(kept), seq))
                    self._bytes += len(new) - nbytes
                    self._m["thinned_records"] += 1
                    self._m["thinned_rows"] += dropped
                db.executemany(
                    "UPDATE records SET body = ?, nbytes = ?, nrows = ?, thinned = 1 WHERE seq = ?", rewritten
                )
                db.executemany("UPDATE records SET thinned = 1 WHERE seq = ?", skipped)
                changed = changed or bool(rewritten)
            if changed:
                self._save_meta()

    def _evict_pass(
        self, reason: GapReason, now: float, *, until_bytes: int | None = None, older_than: float | None = None
    ) -> Record | None:
        """Delete the oldest evictable records (down to ``until_bytes``, or those with ``t < older_than``)
        and append one gap record covering them, in one transaction. None if nothing was evictable."""
        db = self._conn()
        where = f"seq > ? AND {_EVICTABLE_SQL}" + (" AND t < ?" if older_than is not None else "")
        extra = (older_than,) if older_than is not None else ()
        ranges: list[list[int]] = []
        kinds: dict[str, int] = {}
        count = rows_lost = freed = 0
        cursor = 0
        with self._transaction():
            done = False
            while not done:
                batch = db.execute(
                    f"SELECT seq, kind, nbytes, nrows FROM records WHERE {where} ORDER BY seq LIMIT ?",
                    (cursor, *_EVICTABLE, *extra, _BATCH),
                ).fetchall()
                if not batch:
                    break
                for seq, kind, nbytes, nrows in batch:
                    if until_bytes is not None and self._bytes - freed <= until_bytes:
                        done = True
                        break
                    if ranges and ranges[-1][1] == seq - 1:
                        ranges[-1][1] = seq
                    elif len(ranges) < MAX_GAP_RANGES:
                        ranges.append([seq, seq])
                    else:
                        done = True  # this gap record is full; the caller runs another pass
                        break
                    cursor = seq
                    count += 1
                    freed += nbytes
                    kinds[kind] = kinds.get(kind, 0) + 1
                    if kind == Kind.PREDICTIONS.value:
                        rows_lost += nrows
            if not count:
                return None
            db.executemany("DELETE FROM records WHERE seq BETWEEN ? AND ?", ranges)
            body = {
                "ranges": ranges,
                "count": count,
                "rows": rows_lost,
                "reason": reason.value,
                "kinds": kinds,
                "bytes": freed,
            }
            text = json.dumps(body, separators=(",", ":"))
            seq = self._m["last_seq"] + 1
            db.execute(
                "INSERT INTO records (seq, kind, t, body, nbytes, nrows) VALUES (?, ?, ?, ?, ?, 0)",
                (seq, Kind.GAP.value, now, text, len(text)),
            )
            self._m["last_seq"] = seq
            self._m["evicted_records"] += count
            self._m["evicted_rows"] += rows_lost
            self._m["gaps_written"] += 1
            self._bytes += len(text) - freed
            self._save_meta()
        return Record(seq, Kind.GAP, now, body)


class _RateMeter:
    """Bytes appended per hour over the last hour, in one-minute buckets (in memory: 0 after a restart)."""

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()  # [bucket start, bytes]

    def add(self, now: float, nbytes: int) -> None:
        start = now - now % _RATE_BUCKET_S
        if self._buckets and now < self._buckets[-1][0]:
            self._buckets.clear()  # the clock went back: start over
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += nbytes
        else:
            self._buckets.append([start, nbytes])

    def per_hour(self, now: float) -> float:
        while self._buckets and self._buckets[0][0] < now - _RATE_WINDOW_S:
            self._buckets.popleft()
        if not self._buckets or now < self._buckets[-1][0]:
            return 0.0
        span_s = min(max(now - self._buckets[0][0], _RATE_BUCKET_S), _RATE_WINDOW_S)
        return sum(b for _, b in self._buckets) * 3600.0 / span_s


def _prepare(kind: Kind | str, body: dict[str, Any]) -> tuple[Kind, str, int, int]:
    """(kind, body JSON, JSON bytes, prediction rows) of one record; ProtocolError if it cannot be stored."""
    try:
        k = kind if isinstance(kind, Kind) else Kind(kind)
    except ValueError:
        raise ProtocolError(
            f"unknown record kind {kind!r}", hint=f"use one of {', '.join(x.value for x in Kind)}"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{k.value} record body must be a dict, not {type(body).__name__}")
    try:
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(
            f"{k.value} record body is not JSON-able: {exc}",
            hint="use plain str/int/float/bool/None, lists and dicts; NaN/inf as None",
        ) from exc
    if len(text) > MAX_BODY_BYTES:
        raise ProtocolError(
            f"{k.value} record body of {len(text)} bytes exceeds {MAX_BODY_BYTES} (one envelope)",
            hint="split it into several records",
        )
    rows = body.get("rows") if k is Kind.PREDICTIONS else None
    return k, text, len(text), len(rows) if isinstance(rows, list) else 0
