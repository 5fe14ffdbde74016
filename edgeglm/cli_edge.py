"""`edgeglm edge …`: the commands a device runs (torch-free: only edgeglm.runtime and the core).

``edge install`` is what ``edgeglm flash`` runs on the device over SSH and what the OTA path
calls after a download: the same A/B slot state machine (:mod:`edgeglm.runtime.slots`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["DEFAULT_ROOT", "register"]

DEFAULT_ROOT = Path(os.environ.get("EDGEGLM_ROOT", "/opt/edgeglm"))
_RAW = argparse.RawDescriptionHelpFormatter


def _store(args: argparse.Namespace):
    from edgeglm.runtime.slots import SlotStore

    return SlotStore(args.root)


def _print(args: argparse.Namespace, doc: dict, text: str) -> None:
    print(json.dumps(doc, sort_keys=True) if args.json else text)


def _cmd_install(args: argparse.Namespace) -> int:
    from edgeglm.errors import OtaError
    from edgeglm.runtime.slots import SlotState

    store = _store(args)
    if args.provision:
        store.provision(profile=args.provision, trusted_key=Path(args.pubkey).read_bytes() if args.pubkey else None)
    res = store.install(args.bundle, backend=args.backend, commit=not args.no_commit)
    _print(
        args,
        res.to_dict(),
        f"{res.state.value}: {res.version} ({res.bundle_id[:16]}…) slot {res.slot}"
        + (f" — {res.reason}" if res.reason else ""),
    )
    if res.state in (SlotState.FAILED, SlotState.ROLLED_BACK):
        if args.json:
            return OtaError.exit_code
        raise OtaError(f"install failed: {res.reason}", hint="the device still runs its previous model")
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    state = _store(args).commit()
    _print(args, {"state": state.value}, state.value)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    state = _store(args).rollback(args.reason)
    _print(args, {"state": state.value}, state.value)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    st = store.status()
    cur = st["current"]
    running = "none" if not cur else f"slot {st['current_slot']} {cur['name']} {cur['version']} (seq {cur['sequence']})"
    text = (
        f"root {st['root']}  device {st['device']}  runtime {st['runtime_version']}\n"
        f"current: {running}\n"
        f"last install: {st['state']}" + (f" — {st['last_reason']}" if st["last_reason"] else "")
    )
    _print(args, st, text)
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    state = _store(args).recover()
    _print(args, {"state": state.value}, state.value)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import sys
    import time

    from edgeglm.errors import ConfigError
    from edgeglm.runtime.engine import Engine
    from edgeglm.runtime.loop import alarm_config, make_predictor, run_rows
    from edgeglm.runtime.sinks import CsvSink, JsonLinesSink, SqliteSink

    installed = args.bundle is None
    pubkey = device = None
    if not installed:
        pubkey = args.pubkey or (args.root / "trusted.pub")
        if not Path(pubkey).is_file():
            raise ConfigError(
                f"no trusted public key: {pubkey} does not exist",
                hint="pass --pubkey KEY.pub (the key the bundle was signed with)",
            )
        device = args.device
        if device is None and (args.root / "device.json").is_file():
            device = json.loads((args.root / "device.json").read_text()).get("profile")
    sources = [x for x in (args.replay, args.stdin or None, args.mqtt) if x]
    if len(sources) != 1:
        raise ConfigError(
            "give exactly one source: --replay FILE, --stdin or --mqtt HOST:PORT",
            hint="e.g. edgeglm edge predict model.eglm --replay test_FD001.txt --pubkey fleet.key.pub",
        )
    t0 = time.perf_counter()
    if installed:  # the model this device runs, verified at install (see SlotStore.open_current)
        engine = Engine.open_installed(args.root, backend=args.backend, threads=args.threads)
    else:
        engine = Engine.open(args.bundle, public_key=pubkey, device=device, backend=args.backend, threads=args.threads)
    overrides = {"rul_low": args.rul_low, "rul_clear": args.rul_clear, "debounce": args.debounce}
    predictor = make_predictor(engine, alarm=alarm_config(engine.manifest, overrides))
    sinks: list = [] if args.quiet else [JsonLinesSink(sys.stdout)]
    if args.sqlite:
        sinks.append(SqliteSink(args.sqlite))
    if args.csv:
        sinks.append(CsvSink(args.csv))
    metrics = server = None
    if args.metrics_port is not None:
        from edgeglm.runtime.metrics import MetricsServer, RuntimeMetrics

        m = engine.manifest
        metrics = RuntimeMetrics(
            predictor,
            model={
                "name": m.name,
                "version": m.version,
                "backend": engine.backend_name,
                "bundle_id": engine.bundle.bundle_id[:16],
            },
        )
        server = MetricsServer(metrics, port=args.metrics_port)
        print(f"metrics on {server.url}/metrics, health on {server.url}/healthz", file=sys.stderr)
    mqtt = None
    if args.replay:
        from edgeglm.runtime.sources import replay_file

        units = {int(u) for u in args.units.split(",")} if args.units else None
        columns = tuple(c.strip() for c in args.columns.split(",")) if args.columns else None
        spec = engine.manifest.window_spec
        keep = {*spec["sensor_names"], *spec["setting_names"]}  # the file's unused columns are not bad rows
        rows = replay_file(args.replay, rate=args.rate, columns=columns, units=units, keep=keep)
        batch = args.batch if args.rate <= 0 else 1
    elif args.stdin:
        from edgeglm.runtime.sources import stdin_rows

        rows, batch = stdin_rows(sys.stdin), 1
    else:
        from edgeglm.runtime.sources import MqttSensorSource

        host, _, port = args.mqtt.rpartition(":")
        mqtt = MqttSensorSource(host or "127.0.0.1", int(port), args.topic, stream_level=args.stream_level)
        rows, batch = iter(mqtt), 1
    try:
        counters = run_rows(predictor, rows, sinks, metrics=metrics, batch=batch)
    except KeyboardInterrupt:
        counters = predictor.counters
    finally:
        for sink in sinks:
            sink.close()
        if mqtt is not None:
            mqtt.close()
        if server is not None and not args.linger:
            server.close()
        engine.close()
    elapsed = time.perf_counter() - t0
    c = counters
    print(
        f"{c.rows} rows, {c.predictions} predictions, {c.alarms_raised} alarms raised, "
        f"{c.total()} bad readings ({c.dropped} rows dropped, {c.rejected} rejected), {c.sensor_faults} sensor "
        f"faults; backend {engine.backend_name}; {elapsed:.2f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import contextlib
    import logging
    import sys

    from edgeglm.runtime.agent import Agent, install_signal_handlers
    from edgeglm.runtime.agent_config import load_agent_config
    from edgeglm.runtime.slots import SlotStore

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = load_agent_config(args.config)
    if not config.bundle:
        SlotStore(config.root).recover()  # finish an install a power cut interrupted before loading the model
    agent = Agent(config, out=sys.stdout)
    install_signal_handlers(agent)
    stats = agent.run(drain=args.drain, drain_timeout_s=args.drain_timeout)
    rss_mb = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:  # peak RSS (Linux)
        rss_mb = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    summary = {
        "node": config.node,
        **stats.to_dict(),
        "acked_seq": agent.outbox.acked_seq,
        "last_seq": agent.outbox.last_seq,
        "rss_mb": rss_mb,
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``edge`` command group to the main parser."""
    edge = sub.add_parser(
        "edge",
        help="on-device commands: install/commit/rollback bundles, status",
        description="Commands a Jetson or ARM gateway runs. They need only 'pip install edgeglm[runtime]' "
        "(no torch). The device root (default $EDGEGLM_ROOT or /opt/edgeglm) holds the A/B slots.",
        epilog="example: edgeglm edge status --root /opt/edgeglm",
        formatter_class=_RAW,
    )
    esub = edge.add_subparsers(dest="edge_command", metavar="EDGE_COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"device root (default: {DEFAULT_ROOT})")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = esub.add_parser(
        "install",
        help="verify a bundle, install it in the inactive slot, health-check, switch",
        description="Verify (signature with ROOT/trusted.pub, hashes, device, anti-downgrade), extract into the "
        "inactive slot, run the golden-input health check, switch 'current' atomically, commit. "
        "Any failure leaves the previous model running. Re-installing the running bundle is a no-op.",
        epilog="example: edgeglm edge install model-v2.eglm --root /opt/edgeglm",
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path)
    common(p)
    p.add_argument(
        "--no-commit",
        action="store_true",
        help="stop in probation: 'edge commit' or 'edge rollback' decides (used by flash)",
    )
    p.add_argument("--backend", help="force a backend for the health check (default: the bundle's first available)")
    p.add_argument("--provision", metavar="PROFILE", help="first install: record this device profile")
    p.add_argument("--pubkey", type=Path, help="with --provision: the public key this device will trust")
    p.set_defaults(func=_cmd_install)

    p = esub.add_parser(
        "predict",
        help="run a bundle on sensor rows: replay a file, stdin JSON lines or an MQTT topic",
        description="Verify and load a bundle, stream rows through the predictor (window, normalization, "
        "inference, alarms with hysteresis) and print one JSON line per event (prediction, "
        "alarm_raised, alarm_cleared, sensor_fault, row_rejected). Bad rows are counted, never fatal. "
        "Replay files: C-MAPSS text (unit cycle settings sensors; columns.json beside it for "
        "'edgeglm simulate' output) or CSV with a header (stream, t, sensor columns).",
        epilog="examples:\n"
        "  edgeglm edge predict fd001.eglm --pubkey fleet.key.pub --replay test_FD001.txt --units 1,2\n"
        "  edgeglm edge predict fd001.eglm --pubkey fleet.key.pub --replay line.csv --rate 10 \\\n"
        "      --sqlite events.db --metrics-port 9108\n"
        "  edgeglm edge predict fd001.eglm --mqtt 127.0.0.1:1883 --topic 'factory/line1/+/sensors' "
        "--stream-level 2",
        formatter_class=_RAW,
    )
    p.add_argument(
        "bundle",
        type=Path,
        nargs="?",
        help="bundle file or folder (default: the model installed under --root, as the agent runs it)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help=f"device root: trusted.pub and device.json come from here unless given (default: {DEFAULT_ROOT})",
    )
    p.add_argument("--pubkey", type=Path, help="trusted public key (default: ROOT/trusted.pub)")
    p.add_argument("--device", help="this device's profile (default: ROOT/device.json; the arch is always checked)")
    p.add_argument("--backend", choices=["onnxruntime", "litert", "tensorrt"], help="force a backend")
    p.add_argument("--threads", type=int, help="inference threads (default: the profile's)")
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--replay", type=Path, metavar="FILE", help="replay a C-MAPSS text or CSV file")
    src.add_argument("--stdin", action="store_true", help="read JSON lines from stdin")
    src.add_argument("--mqtt", metavar="HOST:PORT", help="subscribe to a sensor topic on this broker")
    p.add_argument("--topic", default="edgeglm/sensors/+", help="MQTT topic filter (default: edgeglm/sensors/+)")
    p.add_argument("--stream-level", type=int, help="topic level holding the stream id, when rows lack 'stream'")
    p.add_argument("--rate", type=float, default=0.0, help="replay rows per second (default: 0 = as fast as possible)")
    p.add_argument("--units", help="replay only these units/streams, e.g. 1,2,3")
    p.add_argument("--columns", help="column names of a headerless text file (stream and time first)")
    p.add_argument("--batch", type=int, default=256, help="rows per inference batch for unpaced replay (default: 256)")
    p.add_argument("--sqlite", type=Path, help="also log events to this SQLite file (WAL)")
    p.add_argument("--csv", type=Path, help="also log events to this CSV file")
    p.add_argument("--quiet", action="store_true", help="no JSON lines on stdout (only the summary on stderr)")
    p.add_argument("--metrics-port", type=int, help="serve /healthz and /metrics on 127.0.0.1:PORT (0 = any)")
    p.add_argument("--linger", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rul-low", type=float, help="override the bundle's alarm threshold")
    p.add_argument("--rul-clear", type=float, help="override the bundle's alarm clear threshold")
    p.add_argument("--debounce", type=int, help="override the bundle's debounce")
    p.set_defaults(func=_cmd_predict)

    p = esub.add_parser(
        "run",
        help="the edge agent: predict on a sensor source, raise alarms, sync with the cloud over MQTT",
        description="Run the installed model (or agent.bundle) on the configured source; alarms are printed and "
        "stored locally even with no broker; every record goes to the SQLite outbox first and leaves "
        "it only when the cloud acknowledges it. See runtime/agent_config.py for every key.",
        epilog="example: edgeglm edge run --config /etc/edgeglm/edge.toml\n\n"
        'minimal edge.toml:\n  [agent]\n  node = "press-07"\n  root = "/opt/edgeglm"\n'
        '  [source]\n  kind = "mqtt"\n  topic = "factory/line1/press-07/sensors"\n'
        '  [sync]\n  host = "broker.local"\n  username = "press-07"\n'
        '  password_file = "/etc/edgeglm/mqtt-password"',
        formatter_class=_RAW,
    )
    p.add_argument("--config", type=Path, required=True, help="edge.toml")
    p.add_argument("--drain", action="store_true", help="when the source ends, wait until the cloud acked everything")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait with --drain (default: 60)")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections and acks to stderr")
    p.set_defaults(func=_cmd_run)

    p = esub.add_parser("commit", help="make the model in probation permanent")
    common(p)
    p.set_defaults(func=_cmd_commit)
    p = esub.add_parser("rollback", help="return to the previous slot (only before commit)")
    common(p)
    p.add_argument("--reason", default="rolled back on request", help="recorded in the state")
    p.set_defaults(func=_cmd_rollback)
    p = esub.add_parser("status", help="what runs, the last install's state, free space")
    common(p)
    p.set_defaults(func=_cmd_status)
    p = esub.add_parser("recover", help="finish an install a crash interrupted (safe to run any time)")
    common(p)
    p.set_defaults(func=_cmd_recover)
