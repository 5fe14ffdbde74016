"""Bundles per device profile: size, build / verify / flash time, and a tampered copy refused.

Usage::

    python benchmarks/bundle.py [--compressed DIR] [--profiles a,b,…]

Takes the compressed FD001 model that ``benchmarks/compress.py`` leaves in
``runs/bench-compress/compressed`` (or ``--compressed``), a throw-away signing key, and:

1. builds one bundle per profile (single file), timing each build; profiles whose preferred
   backend cannot be built here (LiteRT without the ``litert`` extra) are reported as skipped;
2. verifies each one (signature, hashes, device, arch) and times it;
3. flashes the host-architecture bundle over SSH to a device root on this machine through a
   real ``sshd`` on 127.0.0.1 (first flash: provision + install + health check + commit) and
   times it, then flashes it again (a no-op);
4. flips one byte of the model inside a copy and checks ``verify`` refuses it, naming the file.

Last line: one JSON object with the sizes, the seconds, ``"verified"`` and ``"tamper_rejected"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = (
    "generic-x86_64",
    "generic-arm64",
    "raspberry-pi-5",
    "raspberry-pi-4",
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "jetson-xavier-nx",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressed", type=Path, default=REPO / "runs/bench-compress/compressed")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    args = ap.parse_args()
    if not (args.compressed / "golden_windows.npy").is_file():
        print(f"no compressed model at {args.compressed}: run benchmarks/compress.py first", file=sys.stderr)
        return 2

    from edgeglm.bundle import Bundle
    from edgeglm.devices.build import build_bundle
    from edgeglm.devices.profile import load_profile
    from edgeglm.errors import BundleError, ConfigError
    from edgeglm.signing import generate_keypair

    work = Path(tempfile.mkdtemp(prefix="edgeglm-bench-bundle-"))
    key, pub = generate_keypair(work / "fleet.key")
    sizes: dict[str, int] = {}
    build_s: dict[str, float] = {}
    verify_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    verified = True
    paths: dict[str, Path] = {}
    print(f"{'profile':24}{'backends':28}{'files':34}{'KiB':>8}{'build s':>9}{'verify ms':>11}")
    for name in args.profiles.split(","):
        profile = load_profile(name)
        t0 = time.perf_counter()
        try:
            bundle = build_bundle(args.compressed, profile, key, version="1")
        except ConfigError as exc:
            skipped[name] = exc.message
            print(f"{name:24}skipped: {exc.message}")
            continue
        path = bundle.write(work / f"{name}.eglm")
        build_s[name] = time.perf_counter() - t0
        sizes[name] = path.stat().st_size
        t0 = time.perf_counter()
        try:
            Bundle.open(path).verify(pub, device=name, arch=profile.arch)
        except BundleError as exc:
            verified = False
            print(f"{name}: verify failed: {exc.message}", file=sys.stderr)
        verify_s[name] = time.perf_counter() - t0
        paths[name] = path
        files = ", ".join(bundle.manifest.files)
        print(
            f"{name:24}{','.join(bundle.manifest.backends):28}{files:34}{sizes[name] / 1024:>8.1f}"
            f"{build_s[name]:>9.2f}{verify_s[name] * 1000:>11.1f}"
        )

    # tamper: flip one byte of the model in a folder copy
    host = "generic-arm64" if platform.machine() in ("aarch64", "arm64") else "generic-x86_64"
    if host not in paths:  # the tamper and flash checks use the host's generic profile
        profile = load_profile(host)
        paths[host] = build_bundle(args.compressed, profile, key, version="1").write(work / f"{host}.eglm")
    folder = Bundle.open(paths[host]).write(work / "tampered")
    model = folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    try:
        Bundle.open(folder).verify(pub, device=host)
        tamper_rejected, tamper_reason = False, "accepted!"
    except BundleError as exc:
        tamper_rejected, tamper_reason = True, exc.message
    print(f"tampered copy: {'refused' if tamper_rejected else 'ACCEPTED'} ({tamper_reason})")

    flash_s = reflash_s = None
    sys.path.insert(0, str(REPO / "tests"))
    from sshd_server import SshdError, start_sshd

    try:
        server = start_sshd(work / "sshd")
    except SshdError as exc:
        print(f"flash: skipped ({exc})")
        server = None
    if server is not None:
        from edgeglm.devices.flash import FlashOptions, Target, flash_device, local_bundle

        known = work / "known_hosts"
        known.write_text(server.host_key_line + "\n")
        root = work / "device"
        target = Target(
            user="root",
            host="127.0.0.1",
            port=server.port,
            identity=server.user_key,
            device_root=str(root),
            remote_edgeglm=str(Path(sys.executable).with_name("edgeglm")),
        )
        options = FlashOptions(pubkey=pub, known_hosts=known)
        try:
            with local_bundle(paths[host]) as local:
                t0 = time.perf_counter()
                report = asyncio.run(flash_device(local, target, options, log=lambda line: None))
                flash_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                again = asyncio.run(flash_device(local, target, options, log=lambda line: None))
                reflash_s = time.perf_counter() - t0
            print(
                f"flash over loopback SSH: {report.outcome.value} in {flash_s:.2f} s; "
                f"again: {again.outcome.value} in {reflash_s:.2f} s"
            )
        finally:
            server.stop()
    figures = {
        "bench": "bundle",
        "sizes": sizes,
        "build_s": {k: round(v, 3) for k, v in build_s.items()},
        "verify_s": {k: round(v, 4) for k, v in verify_s.items()},
        "flash_s": None if flash_s is None else round(flash_s, 2),
        "reflash_s": None if reflash_s is None else round(reflash_s, 2),
        "skipped": skipped,
        "verified": verified and bool(sizes),
        "tamper_rejected": tamper_rejected,
    }
    print(json.dumps(figures))
    return 0 if verified and tamper_rejected else 1


if __name__ == "__main__":
    sys.exit(main())
