"""Edge → cloud through the outbox vs a bare paho QoS 1 loop; backlog drain; bytes; agent RSS.

Usage::

    python benchmarks/sync.py [--compressed DIR] [--rows N] [--backlog N]

Runs a real Mosquitto on 127.0.0.1 (persistence on) and the cloud daemon (SQLite store,
``synchronous=FULL``) in this process, and:

1. **sustained**: ``edgeglm edge run`` as a separate process replays ``--rows`` sensor rows
   (a simulated line) as fast as it can, one prediction per record, every record durably in
   the outbox before it is published, deleted only after the cloud's ack; timed from process
   start until the cloud has acknowledged everything (``--drain``). Records/s.
2. **baseline**: the same envelopes (the bytes the agent sent, rebuilt from the cloud store)
   published by a bare paho client, QoS 1, waiting for every PUBACK — no outbox, no store,
   no acks. ``ratio`` = sustained / baseline.
3. **drain**: ``--backlog`` records written into a node's outbox while it is offline, then an
   agent with nothing new to say connects and drains them into the cloud store. Records/s.

``edge_ratio`` isolates the outbox: the same records appended durably (batches of 64,
``synchronous=FULL``), enveloped and published QoS 1 with every PUBACK awaited, vs the bare loop.
Plus bytes on the wire per prediction and the agent process's peak RSS (VmHWM). ``lost`` =
records produced minus records in the cloud store (gap-covered ones would count as covered;
no bound is hit here). Last line: one JSON object (``ratio, records_per_s, drain_per_s,
bytes_per_prediction, rss_mb, lost``). Goals (issue): ratio ≥ 0.5, drain ≥ 5,000 records/s.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE = "press-07"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressed", type=Path, default=REPO / "runs/bench-compress/compressed")
    ap.add_argument("--rows", type=int, default=30_000, help="sensor rows the agent replays (default: 30000)")
    ap.add_argument("--backlog", type=int, default=100_000, help="records in the offline backlog (default: 100000)")
    args = ap.parse_args()
    if not (args.compressed / "golden_windows.npy").is_file():
        print(f"no compressed model at {args.compressed}: run benchmarks/compress.py first", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "tests"))
    from brokers import Mosquitto

    from edgeglm.data.factory import LineConfig, simulate_line
    from edgeglm.devices.build import build_bundle
    from edgeglm.devices.profile import load_profile
    from edgeglm.protocol import Envelope, Kind, Record
    from edgeglm.runtime.agent import Agent
    from edgeglm.runtime.agent_config import load_agent_config
    from edgeglm.runtime.cloud.daemon import BrokerConfig, CloudConfig, CloudDaemon, StoreConfig
    from edgeglm.runtime.outbox import Outbox
    from edgeglm.runtime.slots import SlotStore
    from edgeglm.signing import generate_keypair

    work = Path(tempfile.mkdtemp(prefix="edgeglm-bench-sync-"))
    key, pub = generate_keypair(work / "fleet.key")
    profile = load_profile("generic-x86_64")
    bundle = build_bundle(args.compressed, profile, key, version="1").write(work / "m.eglm")
    store = SlotStore(work / "root")
    store.provision(profile=profile.name, trusted_key=pub.read_bytes())
    store.install(bundle)
    spec = json.loads((args.compressed / "window_spec.json").read_text())

    # rows: the simulated line has other sensors than FD001; write a CSV with the model's columns
    ds = simulate_line(LineConfig(units_train=4, units_test=max(10, args.rows // 160)), seed=3)
    import numpy as np

    rng = np.random.default_rng(0)
    n = min(args.rows, len(ds.test))
    line = work / "line.csv"
    with open(line, "w") as f:
        f.write(",".join(["stream", "t", *spec["setting_names"], *spec["sensor_names"]]) + "\n")
        means = np.asarray(spec["normalization"]["mean"][0])
        stds = np.asarray(spec["normalization"]["std"][0])
        for i in range(n):
            vals = means + stds * rng.standard_normal(len(means))
            f.write(
                f"{ds.test.unit[i]},{ds.test.cycle[i]},"
                + ",".join("0" for _ in spec["setting_names"])
                + ","
                + ",".join(f"{v:.5g}" for v in vals)
                + "\n"
            )

    (work / "broker").mkdir()
    broker = Mosquitto(work / "broker")
    db = work / "cloud.db"
    daemon = CloudDaemon(
        CloudConfig(
            broker=BrokerConfig(host=broker.host, port=broker.port, protocol="3.1.1"),
            store=StoreConfig(path=db),
            client_id="bench-cloud",
        )
    )
    daemon.start()
    assert daemon.wait_ready(15)
    edge_toml = work / "edge.toml"
    edge_toml.write_text(
        f'[agent]\nnode = "{NODE}"\nroot = "{work / "root"}"\n[source]\nkind = "replay"\npath = "{line}"\n'
        f"[sync]\nport = {broker.port}\nrows_per_record = 1\nrecords_per_publish = 64\ninflight = 16\n"
    )
    try:
        # 1. sustained, through a separate agent process
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("edgeglm")),
                "edge",
                "run",
                "--config",
                str(edge_toml),
                "--drain",
                "--drain-timeout",
                "300",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        sustained_s = time.perf_counter() - t0
        agent_stats = json.loads(done.stderr.strip().splitlines()[-1])
        produced = agent_stats["last_seq"]
        with sqlite3.connect(db) as c:
            stored = c.execute("SELECT COUNT(*) FROM records WHERE node = ?", (NODE,)).fetchone()[0]
            rows = c.execute("SELECT seq, kind, t, body FROM records WHERE node = ? ORDER BY seq", (NODE,)).fetchall()
            inc = c.execute("SELECT inc FROM records WHERE node = ? LIMIT 1", (NODE,)).fetchone()[0]
        records_per_s = produced / sustained_s
        bytes_per_prediction = agent_stats["bytes_sent"] / max(agent_stats["predictions"], 1)

        # 2. baseline: the same envelopes, bare paho QoS 1, all PUBACKs
        import paho.mqtt.client as mqtt

        recs = [Record(s, Kind(k), t, json.loads(b)) for s, k, t, b in rows]
        payloads = [Envelope(NODE, inc, 1, tuple(recs[i : i + 64])).to_bytes() for i in range(0, len(recs), 64)]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare")
        c.max_inflight_messages_set(16)
        c.connect(broker.host, broker.port)
        c.loop_start()
        t0 = time.perf_counter()
        infos = [c.publish("bench/bare", p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(60)
        baseline_s = time.perf_counter() - t0
        baseline_per_s = len(recs) / baseline_s

        # 2b. the edge's publish path alone: the same records appended durably to an outbox in
        #     batches of 64 (synchronous=FULL), enveloped from what was stored, published QoS 1,
        #     every PUBACK awaited — what the outbox costs on top of the bare loop
        with Outbox(work / "edge-only.db", node="press-09") as ob:
            t0 = time.perf_counter()
            infos = []
            for i in range(0, len(recs), 64):
                written = ob.append_many([(r.kind, r.body) for r in recs[i : i + 64]])
                infos.append(c.publish("bench/outbox", ob.envelope(written).to_bytes(), qos=1))
            for info in infos:
                info.wait_for_publish(60)
            edge_s = time.perf_counter() - t0
        c.loop_stop()
        c.disconnect()
        edge_per_s = len(recs) / edge_s

        # 3. drain of an offline backlog
        node2 = "press-08"
        root2 = work / "root2"
        s2 = SlotStore(root2)
        s2.provision(profile=profile.name, trusted_key=pub.read_bytes())
        s2.install(bundle)
        body = {"cols": ["stream", "t", "rul", "health"], "rows": [["1", 1, 100.0, 0.8]], "model": "m:1"}
        with Outbox(root2 / "outbox.db", node=node2) as ob:
            for i in range(0, args.backlog, 1000):
                ob.append_many([(Kind.PREDICTIONS, body)] * min(1000, args.backlog - i))
        (work / "empty.csv").write_text("")
        cfg2 = load_agent_config(
            text=edge_toml.read_text()
            .replace(NODE, node2)
            .replace(str(work / "root"), str(root2))
            .replace(str(line), str(work / "empty.csv"))
        )
        agent = Agent(cfg2)
        t0 = time.perf_counter()
        agent.run(drain=True, drain_timeout_s=600)
        drain_s = time.perf_counter() - t0
        with sqlite3.connect(db) as c2:
            drained = c2.execute("SELECT COUNT(*) FROM records WHERE node = ?", (node2,)).fetchone()[0]
        drain_per_s = drained / drain_s
    finally:
        daemon.stop()
        broker.stop()
    lost = produced - stored
    print(
        f"sustained: {produced} records in {sustained_s:.2f} s = {records_per_s:,.0f}/s (agent process, "
        f"durable outbox, cloud-acked); bare paho QoS1: {baseline_per_s:,.0f}/s; "
        f"ratio {records_per_s / baseline_per_s:.2f}"
    )
    print(
        f"edge publish path alone (durable outbox append + envelope + QoS 1 PUBACK): {edge_per_s:,.0f}/s; "
        f"ratio to the bare loop {edge_per_s / baseline_per_s:.2f}"
    )
    print(f"drain: {drained} backlog records in {drain_s:.2f} s = {drain_per_s:,.0f}/s")
    print(f"wire: {bytes_per_prediction:.1f} B/prediction; agent peak RSS {agent_stats['rss_mb']:.1f} MB; lost {lost}")
    figures = {
        "bench": "sync",
        "records": produced,
        "records_per_s": round(records_per_s, 1),
        "baseline_per_s": round(baseline_per_s, 1),
        "ratio": round(records_per_s / baseline_per_s, 3),
        "edge_publish_per_s": round(edge_per_s, 1),
        "edge_ratio": round(edge_per_s / baseline_per_s, 3),
        "drain_per_s": round(drain_per_s, 1),
        "backlog": args.backlog,
        "bytes_per_prediction": round(bytes_per_prediction, 1),
        "rss_mb": round(agent_stats["rss_mb"], 1),
        "lost": lost,
    }
    print(json.dumps(figures))
    return 0 if lost == 0 and drained == args.backlog else 1


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread error: {a.exc_value}", file=sys.stderr)
    sys.exit(main())
