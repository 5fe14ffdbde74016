"""The durable store-and-forward outbox (edgeglm.runtime.outbox), against real SQLite files.

Every test audits the database with :func:`_audit`: integrity, seqs, the accounting identity
``last_seq = stored + acked + evicted`` and "every unacknowledged seq is stored or covered by a
gap record". The kill tests SIGKILL a writer at random moments; the hypothesis machine runs
random append / ack / reopen / clock sequences against a model.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgeglm.errors import ConfigError, DataError, ProtocolError
from edgeglm.protocol import Envelope, Kind, msg_id
from edgeglm.runtime.outbox import GapReason, Outbox, OutboxConfig

NODE = "press-07"
COLS = ["stream", "t", "rul", "health"]


def _pred(n_rows: int, *, start: int = 0) -> dict:
    return {"cols": COLS, "rows": [["s1", 1000.0 + start + i, 80.0 - i, 0.9] for i in range(n_rows)], "model": "m:1"}


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _audit(path: Path) -> dict:
    """Check the database on disk; returns what it found (meta, stored seq → (kind, body), covered seqs)."""
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [d[1] for d in con.execute("PRAGMA table_info(meta)")]
        meta = dict(zip(cols, con.execute("SELECT * FROM meta").fetchone(), strict=True))
        rows = con.execute("SELECT seq, kind, body, nbytes, nrows FROM records ORDER BY seq").fetchall()
    finally:
        con.close()
    acked, last = meta["acked_seq"], meta["last_seq"]
    stored = {}
    covered: set[int] = set()
    for seq, kind, text, nbytes, nrows in rows:
        assert acked < seq <= last, (seq, acked, last)
        assert nbytes == len(text)
        body = json.loads(text)
        stored[seq] = (Kind(kind), body)
        if kind == Kind.PREDICTIONS.value:
            assert nrows == len(body["rows"])
        if kind == Kind.GAP.value:
            n = 0
            for a, b in body["ranges"]:
                assert a <= b < seq  # a gap covers only older seqs
                covered.update(range(a, b + 1))
                n += b - a + 1
            assert n == body["count"]
            assert body["reason"] in {r.value for r in GapReason}
            assert sum(body["kinds"].values()) == body["count"]
    assert not covered & stored.keys(), "a gap covers a stored record"
    missing = [s for s in range(acked + 1, last + 1) if s not in stored and s not in covered]
    assert not missing, f"seqs neither stored, acked nor covered by a gap: {missing[:20]}"
    assert last == len(rows) + meta["acked_records"] + meta["evicted_records"]
    return {"meta": meta, "stored": stored, "covered": covered}


def _all_pending(ob: Outbox) -> list:
    return ob.pending(limit=10**9, max_bytes=10**12)


# ----------------------------------------------------------------------------- basics


def test_append_pending_ack_basics(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path, node=NODE) as ob:
        assert (ob.last_seq, ob.acked_seq, ob.boot) == (0, 0, 1)
        assert 0 < ob.inc < 2**63
        t1 = time.time() - 5
        r1 = ob.append(Kind.PREDICTIONS, _pred(3), t=t1)
        r2 = ob.append(Kind.ALARM, {"stream": "s1", "raised": True})
        more = ob.append_many([(Kind.HEALTH, {"ok": True}), (Kind.FAULT, {"stream": "s2"})])
        assert [r.seq for r in (r1, r2, *more)] == [1, 2, 3, 4]
        assert r1.t == t1 and r1.kind is Kind.PREDICTIONS
        assert more[0].t == more[1].t
        assert ob.append_many([]) == []

        recs = ob.pending()
        assert [(r.seq, r.kind) for r in recs] == [
            (1, Kind.PREDICTIONS),
            (2, Kind.ALARM),
            (3, Kind.HEALTH),
            (4, Kind.FAULT),
        ]
        assert recs[0].body == _pred(3)
        assert [r.seq for r in ob.pending(after_seq=2)] == [3, 4]
        assert [r.seq for r in ob.pending(limit=2)] == [1, 2]
        assert [r.seq for r in ob.pending(max_bytes=1)] == [1]  # always at least one record

        env = Envelope.from_bytes(ob.envelope(recs).to_bytes("json"))
        assert (env.node, env.inc, env.boot, [r.seq for r in env.records]) == (NODE, ob.inc, 1, [1, 2, 3, 4])
        assert msg_id(ob.inc, 1) == f"{ob.inc:016x}-1"

        assert ob.ack(ob.inc, 2) == 2
        assert ob.acked_seq == 2
        assert [r.seq for r in ob.pending()] == [3, 4]
        assert [r.seq for r in ob.pending(after_seq=0)] == [3, 4]  # nothing below the ack comes back
        assert ob.ack(ob.inc, 4) == 2
        assert ob.pending() == []
        s = ob.stats()
        assert (s.records, s.bytes, s.acked_records, s.last_seq) == (0, 0, 4, 4)
        assert ob.append(Kind.HEALTH, {}).seq == 5  # seq never restarts
    _audit(path)


def test_seq_inc_boot_persist_across_reopen_and_a_new_db_is_a_new_incarnation(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path, node=NODE) as ob:
        inc = ob.inc
        ob.append_many([(Kind.HEALTH, {"i": i}) for i in range(5)])
        ob.ack(inc, 3)
    for boot in (2, 3):
        with Outbox(path, node=NODE) as ob:
            assert (ob.inc, ob.boot, ob.last_seq, ob.acked_seq) == (inc, boot, 5, 3)
            assert [r.seq for r in ob.pending()] == [4, 5]
    with Outbox(path, node=NODE) as ob:
        assert ob.append(Kind.HEALTH, {}).seq == 6
    with Outbox(tmp_path / "other.db", node=NODE) as ob2:
        assert ob2.inc != inc and ob2.last_seq == 0 and ob2.boot == 1
    path.unlink()
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    with Outbox(path, node=NODE) as ob3:  # a wiped outbox is a new incarnation
        assert ob3.inc != inc and ob3.last_seq == 0
    _audit(path)


def test_ack_of_another_incarnation_or_an_old_seq_is_ignored(tmp_path):
    with Outbox(tmp_path / "outbox.db", node=NODE) as ob:
        ob.append_many([(Kind.HEALTH, {"i": i}) for i in range(10)])
        assert ob.ack(ob.inc ^ 1, 10) == 0
        assert ob.ack(ob.inc, 0) == 0
        assert ob.acked_seq == 0 and len(ob.pending()) == 10
        assert ob.ack(ob.inc, 6) == 6
        assert ob.ack(ob.inc, 6) == 0  # duplicate
        assert ob.ack(ob.inc, 4) == 0  # stale (reordered)
        assert ob.acked_seq == 6
        assert [r.seq for r in ob.pending(after_seq=3)] == [7, 8, 9, 10]
        assert [r.seq for r in ob.pending(after_seq=8)] == [9, 10]
        assert ob.ack(ob.inc, 99) == 4  # beyond last_seq: clamped
        assert ob.acked_seq == 10 == ob.last_seq
        assert ob.append(Kind.HEALTH, {}).seq == 11


def test_unstorable_bodies_are_refused_and_nothing_is_stored(tmp_path):
    with Outbox(tmp_path / "outbox.db", node=NODE) as ob:
        ob.append(Kind.HEALTH, {"ok": 1})
        for bad in ({"x": float("nan")}, {"x": object()}, {"x": "y" * 300_000}, ["not", "a", "dict"]):
            with pytest.raises(ProtocolError):
                ob.append(Kind.HEALTH, bad)  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match="unknown record kind"):
            ob.append("telemetry", {})  # type: ignore[arg-type]
        with pytest.raises(ProtocolError):  # one bad item: the whole batch is refused
            ob.append_many([(Kind.HEALTH, {"i": 1}), (Kind.HEALTH, {"x": math.inf})])
        assert ob.last_seq == 1 and len(ob.pending()) == 1
        assert ob.append("alarm", {"raised": True}).kind is Kind.ALARM  # a kind's value works too


def test_config_is_validated_naming_the_key():
    for kwargs, key in [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": 1.5e6}, "max_bytes"),
        ({"max_age_s": 0}, "max_age_s"),
        ({"thin_keep_every": 0}, "thin_keep_every"),
        ({"synchronous": "fast"}, "synchronous"),
        ({"low_water": 1.5}, "low_water"),
    ]:
        with pytest.raises(ConfigError, match=f"outbox.{key}"):
            OutboxConfig(**kwargs)
    assert OutboxConfig.from_mapping({"max_bytes": 8192}).max_bytes == 8192
    with pytest.raises(ConfigError, match="max_megabytes") as exc:
        OutboxConfig.from_mapping({"max_megabytes": 1})
    assert "max_bytes" in (exc.value.hint or "")


def test_second_open_wrong_node_foreign_file_and_other_schema_are_refused(tmp_path):
    path = tmp_path / "outbox.db"
    ob = Outbox(path, node=NODE)
    with pytest.raises(ConfigError, match="already open"):
        Outbox(path, node=NODE)
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        ob.append(Kind.HEALTH, {})
    with pytest.raises(DataError, match="press-08"):
        Outbox(path, node="press-08")
    Outbox(path, node=NODE).close()  # the failed opens released the lock
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET schema_version = 99")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="schema v99"):
        Outbox(path, node=NODE)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not an outbox database"):
        Outbox(junk, node=NODE)
    with pytest.raises(ProtocolError):
        Outbox(tmp_path / "x.db", node="bad/node")


def test_concurrent_append_and_ack_from_two_threads(tmp_path):
    path = tmp_path / "outbox.db"
    ob = Outbox(path, node=NODE, config=OutboxConfig(synchronous="NORMAL"))
    stop = threading.Event()

    def acker() -> None:
        while not stop.is_set():
            recs = ob.pending(limit=20)
            if recs:
                ob.ack(ob.inc, recs[-1].seq)

    th = threading.Thread(target=acker)
    th.start()
    for i in range(200):
        ob.append_many([(Kind.PREDICTIONS, _pred(2, start=i)), (Kind.HEALTH, {"i": i})])
    stop.set()
    th.join()
    ob.close()
    found = _audit(path)
    assert found["meta"]["last_seq"] == 400


def test_importing_the_outbox_does_not_import_torch():
    code = "import sys, edgeglm.runtime.outbox; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- kill -9

_WRITER = """
import random, sys
from edgeglm.protocol import Kind
from edgeglm.runtime.outbox import Outbox, OutboxConfig

path, seed, max_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ob = Outbox(path, node="press-07", config=OutboxConfig(max_bytes=max_bytes))
print(f"O {ob.inc} {ob.boot} {ob.last_seq} {ob.acked_seq}", flush=True)
rng = random.Random(seed)
cols = ["stream", "t", "rul", "health"]

def pred(n):
    return {"cols": cols, "rows": [["s1", float(i), 50.0, 0.5] for i in range(n)], "model": "m:1"}

while True:
    r = rng.random()
    if r < 0.15 and ob.last_seq - ob.acked_seq > 40:
        target = rng.randint(ob.acked_seq + 1, ob.last_seq - 20)
        ob.ack(ob.inc, target)
        print(f"K {target}", flush=True)
    elif r < 0.25:
        rec = ob.append(Kind.ALARM, {"stream": "s1", "raised": True})
        print(f"A {rec.seq} alarm", flush=True)
    elif r < 0.6:
        rec = ob.append(Kind.PREDICTIONS, pred(rng.randint(1, 12)))
        print(f"A {rec.seq} predictions", flush=True)
    else:
        recs = ob.append_many([(Kind.PREDICTIONS, pred(rng.randint(1, 12))) for _ in range(rng.randint(2, 50))])
        print("\\n".join(f"A {x.seq} predictions" for x in recs), flush=True)
"""


def _wait_for_line(log: Path, prefix: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and any(line.startswith(prefix) for line in log.read_text().splitlines()):
            return
        time.sleep(0.005)
    raise AssertionError(f"the writer never printed {prefix!r}: {log.read_text() if log.exists() else ''}")


@pytest.mark.parametrize(("max_bytes", "label"), [(64 * 2**20, "unbounded"), (24_000, "thinning+eviction")])
def test_kill_9_at_random_moments_loses_no_returned_record(tmp_path, max_bytes, label):
    """SIGKILL an appending/acking writer several times; every append that returned is still there
    (or acknowledged, or — under the byte bound — covered by a gap record), nothing else changed."""
    path = tmp_path / "outbox.db"
    rng = random.Random(f"kill-{label}")
    appended: dict[int, str] = {}
    max_ack = 0
    inc = None
    boots: list[int] = []
    for round_ in range(6):
        log = tmp_path / f"writer-{round_}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(path), str(rng.randrange(2**32)), str(max_bytes)],
                stdout=out,
                stderr=subprocess.PIPE,
            )
            try:
                if round_ > 0:  # round 0 may die while creating the database
                    _wait_for_line(log, "O ")
                time.sleep(rng.uniform(0.02, 0.4))
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.wait(timeout=60)
                if proc.stderr:
                    proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        for line in log.read_text().splitlines():
            parts = line.split()
            if parts[0] == "A" and len(parts) == 3:
                assert int(parts[1]) not in appended, f"seq {parts[1]} handed out twice"
                appended[int(parts[1])] = parts[2]
            elif parts[0] == "K" and len(parts) == 2:
                max_ack = max(max_ack, int(parts[1]))
            elif parts[0] == "O" and len(parts) == 5:
                assert inc is None or int(parts[1]) == inc  # the incarnation survives every kill
                inc = int(parts[1])
                boots.append(int(parts[2]))
                assert boots == sorted(set(boots))  # boot counts the opens
        if not path.exists():
            continue
        found = _audit(path)
        meta, stored, covered = found["meta"], found["stored"], found["covered"]
        assert meta["acked_seq"] >= max_ack
        for seq, kind in appended.items():
            assert seq <= meta["last_seq"]
            if seq in stored:
                assert stored[seq][0].value == kind
            elif seq > meta["acked_seq"]:
                assert seq in covered and kind != "alarm", f"returned {kind} record {seq} is lost"
    assert len(appended) > 100, "the writer hardly ran; the kills proved nothing"
    if max_bytes < 2**20:
        assert meta["evicted_records"] > 0 and meta["thinned_records"] > 0
    with Outbox(path, node=NODE) as ob:  # still usable after all that
        assert ob.inc == inc
        assert ob.append(Kind.ALARM, {}).seq == ob.last_seq


# ----------------------------------------------------------------------------- bounds


def test_byte_bound_thins_oldest_predictions_first_then_evicts_with_an_exact_gap(tmp_path):
    path = tmp_path / "outbox.db"
    cfg = OutboxConfig(max_bytes=40_000, thin_keep_every=2, synchronous="NORMAL")
    ob = Outbox(path, node=NODE, config=cfg)
    kinds: dict[int, Kind] = {}
    original_rows: dict[int, list] = {}
    i = 0

    def append_one() -> None:
        nonlocal i
        i += 1
        if i % 10 == 0:
            r = ob.append(Kind.ALARM, {"stream": "s1", "raised": True, "i": i})
        else:
            body = _pred(10, start=i)
            r = ob.append(Kind.PREDICTIONS, body)
            original_rows[r.seq] = body["rows"]
        kinds[r.seq] = r.kind
        assert ob.stats().bytes <= cfg.max_bytes

    # 1. fill until the first thinning: no eviction yet, the oldest predictions are thinned
    while ob.stats().thinned_records == 0:
        append_one()
    s = ob.stats()
    assert s.evicted_records == 0 and s.gaps_written == 0
    assert s.thinned_rows == 5 * s.thinned_records
    recs = {r.seq: r for r in _all_pending(ob)}
    preds = [seq for seq in sorted(recs) if recs[seq].kind is Kind.PREDICTIONS]
    thinned = [seq for seq in preds if "thinned" in recs[seq].body]
    assert thinned == preds[: len(thinned)]  # oldest first
    for seq in thinned:
        assert recs[seq].body["rows"] == original_rows[seq][::2]
        assert recs[seq].body["thinned"] == 5
        assert recs[seq].body["cols"] == COLS and recs[seq].body["model"] == "m:1"
    assert s.bytes <= cfg.low_water * cfg.max_bytes + 1000  # hysteresis: thinned down to the low-water mark

    # 2. keep filling until eviction: one gap record per pass, exactly covering the evicted seqs
    while ob.stats().evicted_records == 0:
        append_one()
    for _ in range(300):  # a few more passes
        append_one()
    s = ob.stats()
    recs = {r.seq: r for r in _all_pending(ob)}
    gaps = [r for r in recs.values() if r.kind is Kind.GAP]
    assert len(gaps) == s.gaps_written >= 2
    assert s.evicted_records >= 5 * s.gaps_written  # passes are rare thanks to the low-water mark
    evicted = {seq for seq in kinds if seq not in recs}
    covered = [q for g in gaps for a, b in g.body["ranges"] for q in range(a, b + 1)]
    assert sorted(covered) == sorted(evicted)  # exact: no seq twice, none missing, none extra
    assert sum(g.body["count"] for g in gaps) == len(evicted) == s.evicted_records
    assert all(g.body["reason"] == "bytes-bound" for g in gaps)
    assert sum(g.body["rows"] for g in gaps) == s.evicted_rows == 5 * len(evicted)  # they were thinned first
    assert sum(g.body["kinds"].get("predictions", 0) for g in gaps) == len(evicted)
    for g in gaps:
        assert g.seq > max(b for _, b in g.body["ranges"])
        assert g.body["bytes"] > 0
    assert all(kinds[q] is Kind.PREDICTIONS for q in evicted)
    assert all(q in recs for q, k in kinds.items() if k is Kind.ALARM)  # every alarm kept
    # accounting: every record appended (ours and the gaps) is stored or evicted
    assert s.last_seq == len(kinds) + s.gaps_written == s.records + s.evicted_records
    assert s.by_kind["gap"] == len(gaps) and s.by_kind["alarm"] == sum(k is Kind.ALARM for k in kinds.values())

    # 3. an ack covering gap records deletes them like any record; the identity still holds
    assert ob.ack(ob.inc, gaps[-1].seq) > 0
    s = ob.stats()
    assert s.last_seq == s.records + s.evicted_records + s.acked_records
    ob.close()
    _audit(path)


def test_eviction_without_thinning_and_only_alarms_left_stays_over_the_bound(tmp_path):
    cfg = OutboxConfig(max_bytes=8192, thin_keep_every=1, synchronous="OFF")
    with Outbox(tmp_path / "outbox.db", node=NODE, config=cfg) as ob:
        for i in range(60):
            ob.append(Kind.PREDICTIONS, _pred(4, start=i))
        s = ob.stats()
        assert s.thinned_records == 0 and s.evicted_records > 0 and s.bytes <= cfg.max_bytes
        for _ in range(100):
            ob.append(Kind.ALARM, {"raised": True, "pad": "x" * 100})
        s = ob.stats()
        assert s.bytes > cfg.max_bytes  # alarms are never evicted
        assert set(s.by_kind) == {"alarm", "gap"}
        assert s.by_kind["alarm"] == 100
    _audit(tmp_path / "outbox.db")


def test_age_bound_evicts_old_telemetry_never_alarms(tmp_path):
    clock = FakeClock()
    path = tmp_path / "outbox.db"
    cfg = OutboxConfig(max_age_s=3600, synchronous="NORMAL")
    ob = Outbox(path, node=NODE, config=cfg, clock=clock)
    old = ob.append_many([(Kind.PREDICTIONS, _pred(3)) for _ in range(5)])
    alarm = ob.append(Kind.ALARM, {"raised": True})
    old += [ob.append(Kind.HEALTH, {"ok": True}), ob.append(Kind.FAULT, {"stream": "s3"})]
    clock.t += 1800
    young = ob.append(Kind.PREDICTIONS, _pred(2))
    assert ob.enforce_bounds() == []  # nothing is old yet
    clock.t += 2000  # the first batch is now 3800 s old, the young record 2000 s
    gaps = ob.enforce_bounds()
    assert len(gaps) == 1
    g = gaps[0].body
    assert g["reason"] == "age-bound" and g["count"] == 7 and g["rows"] == 15
    assert g["ranges"] == [[1, 5], [7, 8]]  # the alarm (seq 6) splits the range
    assert g["kinds"] == {"predictions": 5, "health": 1, "fault": 1}
    assert [r.seq for r in ob.pending()] == [alarm.seq, young.seq, gaps[0].seq]
    assert {r.seq for r in old}.isdisjoint(r.seq for r in ob.pending())
    clock.t += 7200  # appends run the age check too (at most every minute)
    ob.append(Kind.HEALTH, {})
    kinds = [r.kind for r in ob.pending()]
    assert kinds == [Kind.ALARM, Kind.GAP, Kind.GAP, Kind.HEALTH]
    ob.close()
    clock.t += 7200  # and so does opening
    with Outbox(path, node=NODE, config=cfg, clock=clock) as ob:
        assert [r.kind for r in ob.pending()] == [Kind.ALARM, Kind.GAP, Kind.GAP, Kind.GAP]
        assert ob.stats().evicted_records == 9
    _audit(path)


def test_coverage_hours_is_the_byte_bound_over_the_recent_rate(tmp_path):
    clock = FakeClock(1_800_000_000.0)
    mib = 2**20
    cfg = OutboxConfig(max_bytes=64 * mib, max_age_s=7 * 86400, synchronous="OFF")
    with Outbox(tmp_path / "outbox.db", node=NODE, config=cfg, clock=clock) as ob:
        s = ob.stats()
        assert s.bytes_per_hour == 0 and s.coverage_hours == pytest.approx(7 * 24)  # no rate yet: the age bound
        pad = "x" * (mib // 60 - len('{"pad":""}'))
        for _ in range(60):  # 1 MiB over one hour
            ob.append(Kind.HEALTH, {"pad": pad})
            clock.t += 60
        s = ob.stats()
        assert s.bytes_per_hour == pytest.approx(mib, rel=0.03)
        assert s.coverage_hours == pytest.approx(64, rel=0.03)
        assert s.headroom_hours == pytest.approx(63, rel=0.03)
        assert s.to_dict()["coverage_hours"] == s.coverage_hours
    small_age = OutboxConfig(max_bytes=64 * mib, max_age_s=24 * 3600, synchronous="OFF")
    with Outbox(tmp_path / "outbox2.db", node=NODE, config=small_age, clock=clock) as ob:
        for _ in range(60):
            ob.append(Kind.HEALTH, {"pad": pad})
            clock.t += 60
        assert ob.stats().coverage_hours == pytest.approx(24)  # the age bound is the tighter one


# Throughput is measured in benchmarks/sync.py (drain of a 100,000-record backlog), not asserted here.


# ----------------------------------------------------------------------------- hypothesis


def _fat_pred(n_rows: int) -> dict:
    return {"cols": COLS, "rows": [[f"stream-{i:02d}".ljust(40, "."), 1e9 + i, 50.5, 0.5] for i in range(n_rows)]}


_KIND_CHOICES = st.sampled_from([Kind.PREDICTIONS, Kind.PREDICTIONS, Kind.ALARM, Kind.HEALTH, Kind.FAULT])


class OutboxMachine(RuleBasedStateMachine):
    """Random append / ack / reopen / clock sequences under tight bounds, checked against a model."""

    @initialize(keep=st.sampled_from([1, 2, 3]), max_bytes=st.sampled_from([4096, 6000, 64 * 2**20]))
    def setup(self, keep: int, max_bytes: int) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "outbox.db"
        self.clock = FakeClock()
        self.cfg = OutboxConfig(max_bytes=max_bytes, max_age_s=600, thin_keep_every=keep, synchronous="OFF")
        self.ob = Outbox(self.path, node=NODE, config=self.cfg, clock=self.clock)
        self.inc = self.ob.inc
        self.boot = 1
        self.last = 0
        self.acked = 0
        self.appended: dict[int, tuple[Kind, int]] = {}  # seq → (kind, original rows)
        self.last_batch: set[int] = set()

    def teardown(self) -> None:
        if hasattr(self, "ob"):
            self.ob.close()
            self.dir.cleanup()

    def _record(self, recs) -> None:
        assert [r.seq for r in recs] == list(range(recs[0].seq, recs[0].seq + len(recs)))
        assert recs[0].seq > self.last  # monotonic (gap records may take seqs in between)
        for r in recs:
            self.appended[r.seq] = (r.kind, len(r.body.get("rows", [])))
        self.last_batch = {r.seq for r in recs}
        self.last = self.ob.last_seq

    @rule(kind=_KIND_CHOICES, n_rows=st.integers(0, 12))
    def append(self, kind: Kind, n_rows: int) -> None:
        body = _fat_pred(n_rows) if kind is Kind.PREDICTIONS else {"k": kind.value, "pad": "p" * n_rows * 10}
        self._record([self.ob.append(kind, body)])

    @rule(n=st.integers(5, 25), n_rows=st.integers(0, 12), alarm_every=st.sampled_from([0, 3, 7]))
    def burst(self, n: int, n_rows: int, alarm_every: int) -> None:
        for i in range(n):
            if alarm_every and i % alarm_every == 0:
                self._record([self.ob.append(Kind.ALARM, {"i": i})])
            else:
                self._record([self.ob.append(Kind.PREDICTIONS, _fat_pred(n_rows))])

    @rule(kinds=st.lists(_KIND_CHOICES, min_size=1, max_size=6), n_rows=st.integers(1, 12))
    def append_many(self, kinds: list[Kind], n_rows: int) -> None:
        items = [(k, _fat_pred(n_rows) if k is Kind.PREDICTIONS else {"k": k.value}) for k in kinds]
        self._record(self.ob.append_many(items))

    @precondition(lambda self: self.ob.last_seq > self.ob.acked_seq)
    @rule(frac=st.floats(0, 1))
    def ack(self, frac: float) -> None:
        target = self.acked + round(frac * (self.ob.last_seq - self.acked))
        expected = sum(1 for r in _all_pending(self.ob) if r.seq <= target)
        n = self.ob.ack(self.inc, target)
        if target > self.acked:
            assert n == expected
            self.acked = target
        else:
            assert n == 0
        assert self.ob.acked_seq == self.acked

    @rule(back=st.integers(0, 5))
    def ack_stale_or_foreign(self, back: int) -> None:
        assert self.ob.ack(self.inc, self.acked - back) == 0
        assert self.ob.ack(self.inc + 1, self.ob.last_seq) == 0
        assert self.ob.acked_seq == self.acked

    @rule()
    def reopen(self) -> None:
        self.ob.close()
        self.ob = Outbox(self.path, node=NODE, config=self.cfg, clock=self.clock)
        self.boot += 1
        assert (self.ob.inc, self.ob.boot, self.ob.acked_seq) == (self.inc, self.boot, self.acked)
        assert self.ob.last_seq >= self.last  # opening may evict (age) and so write gap records
        self.last = self.ob.last_seq
        self.last_batch = set()

    @rule(dt=st.sampled_from([1.0, 59.0, 300.0, 700.0]))
    def tick(self, dt: float) -> None:
        self.clock.t += dt

    @invariant()
    def consistent(self) -> None:
        ob = self.ob
        recs = _all_pending(ob)
        seqs = [r.seq for r in recs]
        assert seqs == sorted(set(seqs))
        assert all(self.acked < q <= ob.last_seq for q in seqs)
        stored = {r.seq: r for r in recs}
        covered = {q for r in recs if r.kind is Kind.GAP for a, b in r.body["ranges"] for q in range(a, b + 1)}
        assert not covered & stored.keys()
        for q in range(self.acked + 1, ob.last_seq + 1):
            assert q in stored or q in covered, f"seq {q} lost"
        for q, (kind, n_rows) in self.appended.items():
            if q <= self.acked:
                continue
            if q in stored:
                r = stored[q]
                assert r.kind is kind
                if kind is Kind.PREDICTIONS and "thinned" in r.body:
                    k = self.cfg.thin_keep_every
                    assert len(r.body["rows"]) == -(-n_rows // k) and r.body["thinned"] == n_rows - len(r.body["rows"])
            else:
                assert kind.evictable and q in covered
        s = ob.stats()
        assert s.last_seq == s.records + s.acked_records + s.evicted_records
        assert s.records == len(recs) and s.bytes == sum(len(json.dumps(r.body, separators=(",", ":"))) for r in recs)
        if s.bytes > self.cfg.max_bytes:  # only what cannot be evicted (or was just appended) is over the bound
            assert all(not r.kind.evictable or r.seq in self.last_batch for r in recs)


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
