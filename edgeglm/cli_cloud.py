"""`edgeglm cloud …` and `edgeglm broker …`: the cloud sync daemon, the fleet view, the broker's ACL.

Torch-free: these need only ``edgeglm[runtime]`` (paho-mqtt, sqlite3), like the edge commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["register"]

_RAW = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100)


_CLOUD_TOML = """\
  schema_version = 1
  client_id = "edgeglm-cloud-1"         # one per daemon; the broker keeps its session under this id
  share_group = "edgeglm-cloud-…"       # from credentials.toml; daemons of one group split the load

  [broker]
  host = "127.0.0.1"
  port = 1883                           # 8883 with [broker.tls]
  protocol = "5"                        # or "3.1.1"
  username = "edgeglm-cloud"            # from 'edgeglm broker config' credentials.toml
  password_file = "cloud.password"      # or password = "…"

  # [broker.tls]
  # ca = "ca.pem"                       # cert = "cloud.crt" and key = "cloud.key" for client certificates

  [store]
  path = "cloud.db"                     # SQLite (WAL); every daemon of the group writes the same store"""


def _open_store(args: argparse.Namespace):
    from edgeglm.errors import ConfigError
    from edgeglm.runtime.cloud import SqliteStore, load_cloud_config, open_store

    if args.store is not None and args.config is not None:
        raise ConfigError("give --store or --config, not both", hint="--store cloud.db reads that file directly")
    if args.store is not None:
        return SqliteStore(args.store, create=False)
    if args.config is not None:
        return open_store(load_cloud_config(args.config).store, create=False)
    raise ConfigError(
        "which store? give --store FILE (the daemon's SQLite file) or --config cloud.toml",
        hint="e.g. edgeglm cloud nodes --config cloud.toml",
    )


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal

    from edgeglm.runtime.cloud import CloudDaemon, load_cloud_config

    logging.basicConfig(
        level=getattr(logging, args.log_level), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    config = load_cloud_config(args.config)
    daemon = CloudDaemon(config)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds run(), whose finally stops the daemon cleanly

    signal.signal(signal.SIGTERM, _terminate)
    try:
        daemon.run()
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        nodes = store.nodes()
    finally:
        store.close()
    if args.json:
        print(json.dumps([n.to_dict() for n in nodes], sort_keys=True))
        return 0
    if not nodes:
        print("no nodes yet: the daemon has stored nothing (is 'edgeglm cloud run' connected?)")
        return 0
    now = time.time()
    rows = [("NODE", "STATUS", "LAST SEEN", "MODEL", "BACKLOG", "ACKED", "RECORDS", "DUPLICATES", "ALARMS")]
    for n in nodes:
        rows.append(
            (
                n.node,
                n.status.value,
                _ago(n.last_seen, now),
                n.model or "-",
                "-" if n.backlog is None else str(n.backlog),
                str(n.hwm),
                str(n.records),
                str(n.duplicates),
                str(n.active_alarms),
            )
        )
    print(_table(rows))
    return 0


def _cmd_alarms(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        alarms = store.alarms(args.node, active_only=args.active)
    finally:
        store.close()
    if args.limit is not None:
        alarms = alarms[: args.limit]
    if args.json:
        print(json.dumps([a.to_dict() for a in alarms], sort_keys=True))
        return 0
    if not alarms:
        print("no active alarms" if args.active else "no alarms")
        return 0
    rows = [("TIME (UTC)", "NODE", "STREAM", "EVENT", "RUL", "ACTIVE")]
    for a in alarms:
        rul = "-" if a.rul is None else f"{a.rul:.1f}"
        rows.append((_utc(a.t), a.node, a.stream or "-", a.event or "-", rul, "yes" if a.active else ""))
    print(_table(rows))
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from edgeglm.runtime.cloud import load_fleet, write_broker_config

    fleet = load_fleet(args.nodes)
    files = write_broker_config(fleet, args.out, passwd_tool=None if args.no_passwd_tool else "auto")
    print(f"wrote {files.conf}")
    users = f"{len(fleet.nodes)} nodes + cloud user {fleet.cloud.name}"
    print(f"      {files.passwords} ({users}, hashed by {files.hashed_with})")
    print(f"      {files.acl}")
    print(f"      {files.credentials} (plain passwords, mode 0600: give each node its own)")
    if files.generated:
        print(f"new passwords for: {', '.join(files.generated)}")
    print(
        f"cloud.toml of every daemon: [broker] username = {fleet.cloud.name!r} and its password, "
        f"share_group = {files.share_group!r} (keep the group secret from the nodes)"
    )
    if files.owner:
        print(f"handed the password file, ACL and {files.data_dir} to user {files.owner}")
    print(f"start the broker: mosquitto -c {files.conf}   (reload after changes: kill -HUP <pid>)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cloud`` and ``broker`` command groups to the main parser."""
    cloud = sub.add_parser(
        "cloud",
        help="the cloud side: sync daemon, fleet view, alarms",
        description="The cloud end of EdgeGLM's sync: a daemon ingests every node's telemetry and alarms over "
        "MQTT into a store (SQLite) and acknowledges each node's high-water mark; 'nodes' and 'alarms' "
        "read that store.",
        epilog="examples:\n"
        "  edgeglm cloud run --config cloud.toml\n"
        "  edgeglm cloud nodes --config cloud.toml\n"
        "  edgeglm cloud alarms --store cloud.db --active",
        formatter_class=_RAW,
    )
    csub = cloud.add_subparsers(dest="cloud_command", metavar="CLOUD_COMMAND", required=True)

    p = csub.add_parser(
        "run",
        help="run the sync daemon: MQTT in, idempotent store, acks out",
        description=_wrap(
            "Subscribe to every node's telemetry and alarms through a shared subscription "
            "($share/GROUP/edgeglm/v1/+/telemetry …), so several daemons split the load behind one broker; "
            "store each record once, keyed on (node, message id); acknowledge on edgeglm/v1/NODE/ack the highest "
            "seq up to which everything is stored (or declared lost by a gap record). Garbage (undecodable, "
            "oversized, wrong schema or version, a node sending as another) is logged and counted, never stored. "
            "The session is persistent and the daemon reconnects with back-off. Stops on SIGTERM or Ctrl-C; "
            "logs its counters every stats_interval_s."
        )
        + "\n\ncloud.toml:\n"
        + _CLOUD_TOML,
        epilog="example: edgeglm cloud run --config /etc/edgeglm/cloud.toml",
        formatter_class=_RAW,
    )
    p.add_argument("--config", type=Path, required=True, help="the daemon's TOML config (see above)")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default: INFO)",
    )
    p.set_defaults(func=_cmd_run)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", type=Path, help="the daemon's SQLite store file")
        p.add_argument("--config", type=Path, help="or the daemon's cloud.toml (its [store] is read)")
        p.add_argument("--json", action="store_true", help="print one JSON array")

    p = csub.add_parser(
        "nodes",
        help="the fleet: status, last seen, model version, backlog, acked seq, alarms",
        description="One line per node the daemon has heard of: online/offline (the node's retained status "
        "and last will), when its last envelope arrived, the model it runs, the backlog its outbox reported, "
        "the seq acknowledged to it, records and retransmitted duplicates stored, active alarms.",
        epilog="example: edgeglm cloud nodes --config cloud.toml\n         edgeglm cloud nodes --store cloud.db --json",
        formatter_class=_RAW,
    )
    store_args(p)
    p.set_defaults(func=_cmd_nodes)

    p = csub.add_parser(
        "alarms",
        help="alarm records of the fleet, newest first",
        description="Every alarm raised or cleared on the nodes (ALARM records), newest first; --active keeps "
        "only the streams whose latest alarm record raised the alarm.",
        epilog="example: edgeglm cloud alarms --store cloud.db --active\n"
        "         edgeglm cloud alarms --config cloud.toml --node press-07 --json",
        formatter_class=_RAW,
    )
    store_args(p)
    p.add_argument("--active", action="store_true", help="only alarms still active")
    p.add_argument("--node", help="only this node's alarms")
    p.add_argument("--limit", type=int, help="at most this many lines")
    p.set_defaults(func=_cmd_alarms)

    broker = sub.add_parser(
        "broker",
        help="MQTT broker setup: Mosquitto config with per-node credentials and ACL",
        description="Set up the Mosquitto broker the fleet and the cloud daemons share.",
        epilog="example: edgeglm broker config --nodes fleet.toml --out /etc/mosquitto/edgeglm",
        formatter_class=_RAW,
    )
    bsub = broker.add_subparsers(dest="broker_command", metavar="BROKER_COMMAND", required=True)
    p = bsub.add_parser(
        "config",
        help="write mosquitto.conf, password file, ACL and credentials for a fleet",
        description=_wrap(
            "From a fleet TOML, write into OUT: mosquitto.conf (listeners, persistence on, no "
            "anonymous access), passwords (hashed), acl (the cloud user reads and writes edgeglm/v1/#; "
            "'pattern readwrite edgeglm/v1/%u/#' confines every node to its own topics), credentials.toml "
            "(the plain passwords, mode 0600) and data/. Passwords not given are generated; running again keeps "
            "those credentials.toml already holds."
        )
        + "\n\nfleet.toml:\n"
        '  [broker]\n  user = "mosquitto"            # the account Mosquitto runs as (default)\n\n'
        '  [cloud]\n  username = "edgeglm-cloud"     # default\n'
        '  # share_group = "…"           # default: a secret edgeglm-cloud-<random>, kept across runs\n\n'
        "  [[listener]]                    # default: port 1883, all interfaces, plain\n"
        '  port = 8883\n  cafile = "ca.pem"\n  certfile = "server.crt"\n  keyfile = "server.key"\n\n'
        '  [[node]]\n  name = "press-07"\n  [[node]]\n  name = "press-08"\n  password = "…"               # optional',
        epilog="example: edgeglm broker config --nodes fleet.toml --out broker/ && mosquitto -c broker/mosquitto.conf",
        formatter_class=_RAW,
    )
    p.add_argument("--nodes", type=Path, required=True, metavar="FILE", help="the fleet TOML ([[node]] name = …)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write (created if needed)")
    p.add_argument(
        "--no-passwd-tool",
        action="store_true",
        help="hash the passwords in Python even when mosquitto_passwd is installed (same $7$ format)",
    )
    p.set_defaults(func=_cmd_broker_config)
