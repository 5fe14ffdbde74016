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
