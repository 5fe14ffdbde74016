"""`edgeglm keygen | build | inspect | verify | flash`: the commands that make, check and ship bundles.

Registered into the main parser by :func:`register` (see :mod:`edgeglm.cli`). Kept apart from
the training commands so each file reads as one workflow: compress → build → verify → flash.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register"]

_RAW = argparse.RawDescriptionHelpFormatter


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edgeglm.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(args.out, overwrite=args.force)
    print(f"signing key  {priv}  (keep it secret: it can make bundles devices will install)")
    print(f"public key   {pub}  (install on devices; key id {key_id(load_public_key(pub))})")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from edgeglm.devices.build import AlarmThresholds, build_bundle
    from edgeglm.devices.profile import load_profile

    profile = load_profile(args.device, args.devices_dir)
    thresholds = AlarmThresholds(rul_low=args.rul_low, rul_clear=args.rul_clear, debounce=args.debounce)
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    bundle = build_bundle(
        args.compressed,
        profile,
        args.key,
        version=args.version,
        sequence=args.sequence,
        name=args.name,
        thresholds=thresholds,
        backends=backends,
    )
    out = bundle.write(args.out)
    m = bundle.manifest
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.iterdir())
    print(f"bundle {out}  ({size / 1024:.1f} KiB)")
    print(f"  model    {m.name} {m.version} (sequence {m.sequence}, {m.precision})")
    print(f"  device   {m.profile} ({m.arch}); backends {', '.join(m.backends)}")
    print(f"  files    {', '.join(f'{e.name} {e.size / 1024:.1f} KiB' for e in m.files.values())}")
    print(f"  id       {bundle.bundle_id}")
    for note in m.data.get("notes", []):
        print(f"  note     {note}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgeglm.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    m = bundle.manifest
    if args.json:
        doc = dict(m.data)
        doc["golden"] = {k: v for k, v in doc["golden"].items() if k not in ("inputs", "outputs")}
        print(json.dumps({"bundle_id": bundle.bundle_id, "manifest": doc}, indent=2))
        return 0
    golden_in, _ = m.golden()
    print(f"bundle    {args.bundle}  (id {bundle.bundle_id[:16]}…, not verified: use 'edgeglm verify')")
    print(
        f"model     {m.name} {m.version}  sequence {m.sequence}  {m.precision}  "
        f"(recipe {m.data['model'].get('recipe')}, test RMSE {m.data['model'].get('test_rmse')})"
    )
    print(f"device    {m.profile}  {m.arch}  backends {', '.join(m.backends)}")
    for t in m.inputs:
        print(f"input     {t.name} {list(t.shape)} {t.dtype}")
    for t in m.outputs:
        print(f"output    {t.name} {list(t.shape)} {t.dtype}")
    for e in m.files.values():
        print(f"file      {e.name:<14} {e.size:>9} B  sha256 {e.sha256[:16]}…  {e.role} ({', '.join(e.backends)})")
    print(f"window    {m.window_spec.get('window')} rows × {len(m.window_spec.get('sensor_names', []))} sensors")
    print(f"alarm     {m.thresholds}")
    print(
        f"golden    {', '.join(f'{k} {list(v.shape)}' for k, v in golden_in.items())}; "
        f"tolerance {m.data['golden'].get('tolerance')}"
    )
    print(f"created   {m.data['created']} by edgeglm {m.data['toolkit'].get('version')}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from edgeglm.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    arch = args.arch
    if args.device and arch is None:
        from edgeglm.devices.profile import load_profile

        arch = load_profile(args.device, args.devices_dir).arch
    report = bundle.verify(args.pubkey, device=args.device, arch=arch, installed_sequence=args.installed_sequence)
    print(f"verified {args.bundle} (id {report.bundle_id[:16]}…)")
    print(report)
    return 0


def _cmd_flash(args: argparse.Namespace) -> int:
    import asyncio

    from edgeglm.devices.flash import (
        FlashOptions,
        FlashOutcome,
        Target,
        flash_device,
        flash_fleet,
        format_summary,
        load_fleet,
        local_bundle,
    )
    from edgeglm.errors import ConfigError, FlashError

    options = FlashOptions(
        pubkey=args.pubkey,
        known_hosts=args.known_hosts,
        accept_host_key=args.accept_host_key,
        dry_run=args.dry_run,
        chunk_bytes=max(1, round(args.chunk_kib * 1024)),
        limit_bytes_per_s=None if args.limit_kib_s is None else args.limit_kib_s * 1024,
        install_timeout_s=args.install_timeout,
    )
    if args.fleet is not None:
        targets = load_fleet(args.fleet, device_root=args.device_root, remote_edgeglm=args.remote_edgeglm)
    else:
        if args.identity is None:
            raise ConfigError("--to needs --identity", hint="pass the SSH private key to log in with: --identity KEY")
        targets = [
            Target.parse(
                args.to, identity=args.identity, device_root=args.device_root, remote_edgeglm=args.remote_edgeglm
            )
        ]
    with local_bundle(args.bundle) as bundle:
        m = bundle.bundle.manifest
        print(f"bundle {m.name} {m.version} (sequence {m.sequence}) for {m.profile}, id {bundle.bundle_id[:16]}…")
        if args.fleet is None:
            report = asyncio.run(flash_device(bundle, targets[0], options))
            if report.outcome is FlashOutcome.PLANNED:
                print(f"dry run of {report.target}: the plan is above; nothing was changed")
            else:
                print(f"{report.target}: {report.outcome.value} in {report.seconds:.1f} s")
            return 0
        reports = asyncio.run(flash_fleet(bundle, targets, options, parallel=args.parallel))
    print()
    print(format_summary(reports))
    return FlashError.exit_code if any(r.outcome.is_failure for r in reports) else 0


def register(sub: argparse._SubParsersAction, devices_dir_help: str) -> None:
    """Add keygen, build, inspect, verify and flash to the main parser's subcommands."""
    p = sub.add_parser(
        "keygen",
        help="create an Ed25519 signing key pair for bundles",
        description="Write a private signing key (mode 0600) and its public key (KEY.pub). Devices trust the "
        "public key; every bundle they install must be signed with the private one.",
        epilog="example: edgeglm keygen --out keys/fleet.key",
        formatter_class=_RAW,
    )
    p.add_argument("--out", type=Path, required=True, help="private key path; the public key goes to OUT.pub")
    p.add_argument(
        "--force", action="store_true", help="replace an existing key (devices trusting it must be re-keyed)"
    )
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "build",
        help="build a signed bundle of a compressed model for one device profile",
        description="Package the output of 'edgeglm compress' for a device: the model files its backends load "
        "(model.onnx; trt.toml for TensorRT; model.tflite for LiteRT), a manifest with preprocessing, "
        "alarm thresholds, golden inputs/outputs and the sha256 of every file, signed with Ed25519. "
        "OUT ending in .eglm or .tar.zst writes one file (tar + zstd, fixed order); otherwise a folder.",
        epilog="example: edgeglm build runs/fd001-compressed --device jetson-orin-nano-8gb --key keys/fleet.key \\\n"
        "           --version 2 --out dist/fd001-orin.eglm",
        formatter_class=_RAW,
    )
    p.add_argument("compressed", type=Path, help="the --out folder of 'edgeglm compress'")
    p.add_argument("--device", required=True, help="device profile name (see 'edgeglm devices') or a .toml path")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key from 'edgeglm keygen'")
    p.add_argument("--out", type=Path, required=True, help="bundle file (.eglm / .tar.zst) or folder to write")
    p.add_argument("--version", default="1", help="model version shown to people (default: 1)")
    p.add_argument(
        "--sequence", type=int, help="anti-downgrade counter; devices refuse lower ones (default: --version)"
    )
    p.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    p.add_argument("--backends", help="comma-separated subset of the profile's backends (default: all of them)")
    p.add_argument("--rul-low", type=float, default=30.0, help="raise the alarm at RUL ≤ this (default: 30)")
    p.add_argument("--rul-clear", type=float, default=45.0, help="clear it at RUL ≥ this (default: 45)")
    p.add_argument("--debounce", type=int, default=3, help="consecutive predictions to raise/clear (default: 3)")
    p.add_argument("--devices-dir", action="append", default=[], type=Path, help=devices_dir_help)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser(
        "inspect",
        help="show what a bundle holds (without verifying it)",
        description="Print a bundle's manifest: model, device, inputs/outputs, files, thresholds, golden data.",
        epilog="example: edgeglm inspect dist/fd001-orin.eglm --json",
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path, help="bundle file or folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON (golden arrays omitted)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "verify",
        help="check a bundle's signature, hashes, device and sequence",
        description="Run every check a device runs before installing, in order: format, signature, files "
        "(sha256 + size, nothing extra), device profile, CPU architecture, anti-downgrade sequence. "
        "Stops at the first failure and names it (exit code 11 signature, 12 hash, 13 manifest, "
        "14 device, 15 downgrade).",
        epilog="example: edgeglm verify dist/fd001-orin.eglm --pubkey keys/fleet.key.pub --device jetson-orin-nano-8gb",
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path, help="bundle file or folder")
    p.add_argument("--pubkey", type=Path, required=True, help="the trusted public key (KEY.pub)")
    p.add_argument("--device", help="check the bundle is for this profile (and its architecture)")
    p.add_argument("--arch", help="check the CPU architecture (default: the --device profile's)")
    p.add_argument("--installed-sequence", type=int, help="refuse a bundle older than this sequence")
    p.add_argument("--devices-dir", action="append", default=[], type=Path, help=devices_dir_help)
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "flash",
        help="install a bundle on a device (or a fleet) over SSH, rolling back on any failure",
        description="Copy a bundle to a device over SSH/SFTP (resuming an interrupted copy) and install it with "
        "the device's own 'edgeglm edge install': verify, inactive A/B slot, golden-input health check, "
        "atomic switch, restart of the edgeglm-edge unit (if any), commit. Before copying it checks "
        "the device profile and CPU architecture, the anti-downgrade sequence and free space "
        "(3 × the bundle); the bundle the device already runs is a no-op. Any failure puts the "
        "previous slot back and names the step that failed (exit code 41).\n\n"
        "The host key is checked against known_hosts: an unknown one is refused unless "
        "--accept-host-key (which records it), a changed one always.\n\n"
        "A fleet file (TOML) lists devices:\n"
        "  schema_version = 1\n"
        "  [[device]]\n"
        '  to = "root@10.0.0.7"          # user@host[:port]\n'
        '  identity = "keys/deploy"      # SSH key (relative to the fleet file)\n'
        "  port = 22                     # optional\n"
        '  device_root = "/opt/edgeglm"  # optional (default: --device-root)\n'
        '  remote_edgeglm = "/usr/local/bin/edgeglm"   # optional (default: --remote-edgeglm)\n'
        '  name = "press-07"             # optional label',
        epilog="examples: edgeglm flash dist/fd001-orin.eglm --to root@10.0.0.7 --identity ~/.ssh/fleet \\\n"
        "              --pubkey keys/fleet.key.pub        # first flash: provisions the device\n"
        "          edgeglm flash dist/fd001-orin.eglm --fleet line-3.toml --parallel 8\n"
        "          edgeglm flash dist/fd001-orin.eglm --to root@10.0.0.7 --identity KEY --dry-run",
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path, help="bundle file (.eglm) or folder (packed before the copy)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="USER@HOST[:PORT]", help="the device to flash")
    target.add_argument("--fleet", type=Path, metavar="FILE", help="TOML file listing devices (see above)")
    p.add_argument("--identity", type=Path, help="SSH private key to log in with (the only credential tried)")
    p.add_argument("--device-root", default="/opt/edgeglm", help="EdgeGLM root on the device (default: /opt/edgeglm)")
    p.add_argument(
        "--remote-edgeglm",
        default="edgeglm",
        metavar="PATH",
        help="the edgeglm command on the device (default: edgeglm on its PATH)",
    )
    p.add_argument("--known-hosts", type=Path, metavar="FILE", help="known_hosts file (default: ~/.ssh/known_hosts)")
    p.add_argument(
        "--accept-host-key",
        action="store_true",
        help="trust an unknown host key and record it in known_hosts (never a changed one)",
    )
    p.add_argument("--dry-run", action="store_true", help="run the checks and print the plan; change nothing")
    p.add_argument(
        "--pubkey",
        type=Path,
        metavar="KEY.pub",
        help="public key a new device will trust (needed on its first flash); also verifies the bundle",
    )
    p.add_argument("--parallel", type=int, default=4, help="with --fleet: devices flashed at once (default: 4)")
    p.add_argument("--chunk-kib", type=float, default=256, help="SFTP write size in KiB (default: 256)")
    p.add_argument("--limit-kib-s", type=float, metavar="KIB_S", help="cap the copy rate (KiB/s), for thin links")
    p.add_argument(
        "--install-timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="seconds 'edge install' may take (health check, TensorRT engine build) (default: 900)",
    )
    p.set_defaults(func=_cmd_flash)
