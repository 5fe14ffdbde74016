"""``edgeglm flash`` against a real OpenSSH server on loopback (no fakes).

The fixture starts ``sshd`` on a free port with a throwaway host key and key-only login. Each
device is a temp folder on this machine (the "device root"), reached through that sshd; the
device-side command is this venv's ``edgeglm`` (sshd's PATH has no venv). Devices that a test
needs already running a model are set up directly with :class:`SlotStore` (no SSH), so only
the flash under test pays for the round trips.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from runtime_fixtures import host_profile
from sshd_server import SSH_KEYGEN, SSHD, SshdError, SshServer, keygen, start_sshd

from edgeglm.bundle import Bundle, Manifest, canonical_json, decode_array, encode_array
from edgeglm.errors import BundleError, FlashError

EDGEGLM = Path(sys.executable).with_name("edgeglm")
#: The device-side command (sshd's PATH has no venv, so the absolute path).
REMOTE_EDGEGLM = EDGEGLM
PROFILE = host_profile()
OTHER_PROFILE = "generic-arm64" if PROFILE == "generic-x86_64" else "generic-x86_64"

pytestmark = pytest.mark.skipif(
    not SSHD.exists() or not SSH_KEYGEN.exists(),
    reason="flash tests need a real OpenSSH server: /usr/sbin/sshd and ssh-keygen are not installed",
)

flash_mod = pytest.importorskip("edgeglm.devices.flash", reason="edgeglm flash needs asyncssh (the compress extra)")


# --- the SSH server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real ``sshd -D -e`` on 127.0.0.1, key-only auth, stopped by PID at the end."""
    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
    except SshdError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def known_hosts(sshd: SshServer, tmp_path: Path) -> Path:
    """A known_hosts that already trusts the test server."""
    path = tmp_path / "known_hosts"
    path.write_text(sshd.host_key_line + "\n")
    return path


# --- bundles and devices ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bundles:
    v1: Path
    v2: Path
    v0: Path  # sequence 0: a downgrade from v1
    tampered: Path  # v3 with model.onnx altered after signing
    foreign: Path  # v3 signed with another key
    other_profile: Path  # v3 for the other generic profile (another CPU architecture too)
    bad_golden: Path  # v3 whose golden outputs were altered, then signed again with the fleet key
    pubkey: Path


@pytest.fixture(scope="module")
def bundles(compressed_dir: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    from edgeglm.devices.build import build_bundle
    from edgeglm.devices.profile import load_profile
    from edgeglm.signing import generate_keypair, load_private_key, sign

    out = tmp_path_factory.mktemp("bundles")
    key, pub = signing_key
    host = load_profile(PROFILE)

    def build(version: str, *, profile=host, with_key: Path = key):
        return build_bundle(compressed_dir, profile, with_key, version=version, backends=("onnxruntime",))

    paths = {name: build(v).write(out / f"{name}.eglm") for name, v in (("v1", "1"), ("v2", "2"), ("v0", "0"))}

    v3 = build("3")
    files = dict(v3.files)
    onnx = bytearray(files["model.onnx"])
    onnx[len(onnx) // 2] ^= 0xFF
    files["model.onnx"] = bytes(onnx)
    paths["tampered"] = Bundle(v3.manifest, v3.manifest_bytes, v3.signature_bytes, files).write(out / "tampered.eglm")

    other_key, _ = generate_keypair(out / "other.key")
    paths["foreign"] = build("3", with_key=other_key).write(out / "foreign.eglm")
    paths["other_profile"] = build("3", profile=load_profile(OTHER_PROFILE)).write(out / "other.eglm")

    doc = json.loads(v3.manifest_bytes)
    for name, encoded in doc["golden"]["outputs"].items():
        y = decode_array(encoded)
        doc["golden"]["outputs"][name] = encode_array((y + 1000).astype(y.dtype))
    raw = canonical_json(doc)
    bad = Bundle(Manifest.from_bytes(raw), raw, sign(raw, load_private_key(key)).to_bytes(), dict(v3.files))
    paths["bad_golden"] = bad.write(out / "bad_golden.eglm")
    return Bundles(**paths, pubkey=pub)


def _device_on(tmp_path: Path, bundle: Path, pubkey: Path, name: str = "device") -> Path:
    """A provisioned device root already running ``bundle`` (committed), set up without SSH."""
    from edgeglm.runtime.slots import SlotStore

    root = tmp_path / name
    store = SlotStore(root)
    store.provision(profile=PROFILE, trusted_key=pubkey.read_bytes())
    result = store.install(bundle)
    assert result.state.value == "committed", result.reason
    return root


@pytest.fixture
def device_v1(tmp_path: Path, bundles: Bundles) -> Path:
    return _device_on(tmp_path, bundles.v1, bundles.pubkey)


def _state(root: Path) -> dict:
    return json.loads((root / "state.json").read_text())


def _assert_runs(root: Path, bundle: Path, pubkey: Path, state: str | None = "committed") -> None:
    """``current`` is a complete slot holding ``bundle``, verified with the device's trusted key."""
    current = Bundle.open(root / "current")
    assert current.bundle_id == Bundle.open(bundle).bundle_id
    current.verify(root / "trusted.pub", device=PROFILE)
    assert (root / "trusted.pub").read_bytes() == pubkey.read_bytes()
    if state is not None:
        assert _state(root)["state"] == state


def _incoming(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "incoming").iterdir()) if (root / "incoming").is_dir() else []


def _flash(sshd: SshServer, bundle: Path, root: Path, known_hosts: Path, *, remote: Path = REMOTE_EDGEGLM, **options):
    """Flash in-process; returns (report, log lines). FlashError propagates."""
    target = flash_mod.Target.parse(
        f"root@127.0.0.1:{sshd.port}", identity=sshd.user_key, device_root=str(root), remote_edgeglm=str(remote)
    )
    opts = flash_mod.FlashOptions(known_hosts=known_hosts, **options)
    lines: list[str] = []
    with flash_mod.local_bundle(bundle) as local:
        report = asyncio.run(flash_mod.flash_device(local, target, opts, log=lines.append))
    return report, lines


def _flash_cli(sshd: SshServer, bundle: Path, root: Path, known_hosts: Path, *extra: str, remote=REMOTE_EDGEGLM):
    argv = [str(EDGEGLM), "flash", str(bundle), "--to", f"root@127.0.0.1:{sshd.port}", "--identity", str(sshd.user_key)]
    argv += ["--known-hosts", str(known_hosts), "--device-root", str(root), "--remote-edgeglm", str(remote), *extra]
    return argv


# --- host keys and the device command -----------------------------------------------------------


def test_unknown_host_key_is_refused_unless_accepted(sshd: SshServer, bundles: Bundles, tmp_path: Path) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    root = tmp_path / "device"
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.v1, root, known_hosts, pubkey=bundles.pubkey)
    assert "connect failed" in err.value.message and "unknown host" in err.value.message
    assert "--accept-host-key" in err.value.hint
    assert not known_hosts.exists() and not root.exists()


def test_changed_host_key_is_refused_even_with_accept(sshd: SshServer, bundles: Bundles, tmp_path: Path) -> None:
    keygen(tmp_path / "impostor")
    algorithm, blob = (tmp_path / "impostor.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {algorithm} {blob}\n")
    before = known_hosts.read_text()
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.v1, tmp_path / "device", known_hosts, pubkey=bundles.pubkey, accept_host_key=True)
    assert "CHANGED" in err.value.message and "ssh-keygen -R" in err.value.hint
    assert known_hosts.read_text() == before
    assert not (tmp_path / "device").exists()


def test_missing_device_command_says_to_install_the_runtime(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path
) -> None:
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.v2, device_v1, known_hosts, remote=Path("/nonexistent/bin/edgeglm"))
    assert "check failed" in err.value.message and "/nonexistent/bin/edgeglm" in err.value.message
    assert "edgeglm[runtime]" in err.value.hint
    _assert_runs(device_v1, bundles.v1, bundles.pubkey)


# --- flashing -----------------------------------------------------------------------------------


def test_first_flash_records_host_key_provisions_installs_and_commits(
    sshd: SshServer, bundles: Bundles, tmp_path: Path
) -> None:
    from edgeglm.runtime.engine import Engine

    known_hosts = tmp_path / "known_hosts"
    root = tmp_path / "device"
    report, log = _flash(sshd, bundles.v1, root, known_hosts, pubkey=bundles.pubkey, accept_host_key=True)
    assert report.outcome is flash_mod.FlashOutcome.FLASHED, log
    assert known_hosts.read_text() == sshd.host_key_line + "\n"
    assert json.loads((root / "device.json").read_text())["profile"] == PROFILE
    _assert_runs(root, bundles.v1, bundles.pubkey)
    assert [h["state"] for h in _state(root)["history"]][-3:] == ["switching", "probation", "committed"]
    assert _incoming(root) == []  # the uploaded bundle and key were deleted
    steps = [line.split()[1] for line in log]
    assert steps.index("upload") < steps.index("install") < steps.index("restart") < steps.index("commit")
    with Engine.open(root / "current", public_key=root / "trusted.pub", device=PROFILE) as engine:
        assert engine.health_check(runs=2).ok  # the device's current runs the bundle


def test_reflash_of_the_running_bundle_is_a_noop(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path
) -> None:
    before = _state(device_v1)
    report, log = _flash(sshd, bundles.v1, device_v1, known_hosts)
    assert report.outcome is flash_mod.FlashOutcome.CURRENT, log
    assert _state(device_v1) == before
    assert _incoming(device_v1) == []


def _device_reason(bundle: Path, pubkey: Path) -> str:
    """What the device's verification says about ``bundle`` (the same code runs there)."""
    with pytest.raises(BundleError) as err:
        Bundle.open(bundle).verify(pubkey, device=PROFILE)
    return f"verify: {err.value.message}"


@pytest.mark.parametrize("case", ["tampered", "foreign", "other_profile", "v0"])
def test_bad_bundles_are_rejected_before_the_switch(
    case: str, sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path
) -> None:
    bundle = getattr(bundles, case)
    name = Bundle.open(bundle).manifest.name
    expected = {
        "tampered": ("install failed", _device_reason(bundles.tampered, bundles.pubkey)),
        "foreign": ("install failed", _device_reason(bundles.foreign, bundles.pubkey)),
        "other_profile": (
            "check failed",
            f"bundle built for device profile {OTHER_PROFILE!r}, the device is {PROFILE!r}",
        ),
        "v0": ("check failed", f"bundle sequence 0 ({name} 0) is older than the device's 1"),
    }[case]
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundle, device_v1, known_hosts)
    for text in expected:
        assert text in err.value.message
    if case == "v0":
        assert "downgrade refused" in err.value.message
    if case in ("tampered", "foreign"):  # the device verified and refused it: the copy was made, then deleted
        assert _state(device_v1)["state"] == "failed"
    _assert_runs(device_v1, bundles.v1, bundles.pubkey, state=None)
    assert _incoming(device_v1) == []


def test_failed_health_check_keeps_the_previous_slot(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path
) -> None:
    slots_before = sorted(p.name for p in (device_v1 / "slots").iterdir())
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.bad_golden, device_v1, known_hosts)
    message = err.value.message
    assert "install failed: the device refused the bundle: health check:" in message
    assert "golden outputs differ by" in message and "> tolerance" in message
    _assert_runs(device_v1, bundles.v1, bundles.pubkey, state="failed")
    assert _state(device_v1)["reason"].startswith("health check:")
    assert sorted(p.name for p in (device_v1 / "slots").iterdir()) == slots_before  # the bad slot is gone


def test_unprovisioned_device_needs_a_trusted_key_and_the_right_arch(
    sshd: SshServer, bundles: Bundles, known_hosts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "new-device"
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.v1, root, known_hosts)
    assert "check failed" in err.value.message and "not provisioned" in err.value.message
    assert "--pubkey" in err.value.hint
    other = Bundle.open(bundles.other_profile).manifest
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.other_profile, root, known_hosts, pubkey=bundles.pubkey)
    assert f"bundle built for {other.arch} ({OTHER_PROFILE}), the device is " in err.value.message
    assert not root.exists()  # checked with `edge status` and nothing else


class _StatusOnly:
    """A :class:`Transport` fake that answers ``edge status`` with a canned document."""

    def __init__(self, status: dict) -> None:
        self.status = status
        self.commands: list[str] = []

    async def run(self, command: str, *, timeout_s: float) -> flash_mod.CommandResult:
        self.commands.append(command)
        assert " edge status " in f" {command} ", command
        return flash_mod.CommandResult(0, json.dumps(self.status), "")

    async def put(self, local, remote, offset, *, chunk_bytes, on_chunk=None) -> int:
        raise AssertionError("nothing may be copied")

    async def stat(self, remote: str) -> int | None:
        return None

    async def close(self) -> None:
        pass


def test_too_little_free_space_is_refused_before_copying(bundles: Bundles) -> None:
    fake = _StatusOnly(
        {
            "state": "committed",
            "device": {"profile": PROFILE, "arch": Bundle.open(bundles.v1).manifest.arch},
            "current": None,
            "free_bytes": 2 * bundles.v2.stat().st_size,
        }
    )

    async def connect(target, options, log):
        return fake

    target = flash_mod.Target.parse("root@device", identity=Path("/dev/null"))
    with flash_mod.local_bundle(bundles.v2) as local, pytest.raises(FlashError) as err:
        asyncio.run(
            flash_mod.flash_device(local, target, flash_mod.FlashOptions(), log=lambda line: None, connect=connect)
        )
    assert "check failed" in err.value.message and "3 × the bundle's" in err.value.message
    assert len(fake.commands) == 1


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    out: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p)] = (st.st_mtime_ns, os.readlink(p))
        elif p.is_file():
            out[str(p)] = (st.st_mtime_ns, p.read_bytes())
        else:
            out[str(p)] = (st.st_mtime_ns, "dir")
    return out


def test_dry_run_prints_the_plan_and_changes_nothing(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path
) -> None:
    before = _snapshot(device_v1)
    report, _ = _flash(sshd, bundles.v2, device_v1, known_hosts, dry_run=True)
    assert report.outcome is flash_mod.FlashOutcome.PLANNED
    plan = "\n".join(report.plan)
    name = Bundle.open(bundles.v1).manifest.name
    assert f"runs {name} 1 (sequence 1)" in plan and "fits" in plan
    assert "would upload" in plan and "edge install" in plan and "--no-commit" in plan and "edge commit" in plan
    assert _snapshot(device_v1) == before


# --- interruptions ------------------------------------------------------------------------------


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the flash ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _part_size(root: Path) -> int:
    parts = list((root / "incoming").glob("*.part")) if (root / "incoming").is_dir() else []
    return parts[0].stat().st_size if parts else 0


def _settled_part_size(root: Path) -> int:
    """The .part's size once sshd has written what was in flight when the client died."""
    size, since = _part_size(root), time.monotonic()
    while time.monotonic() - since < 0.5:
        time.sleep(0.05)
        if _part_size(root) != size:
            size, since = _part_size(root), time.monotonic()
    return size


@pytest.mark.slow
def test_flash_killed_during_the_copy_resumes(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path, tmp_path: Path
) -> None:
    size = bundles.v2.stat().st_size
    argv = _flash_cli(sshd, bundles.v2, device_v1, known_hosts, "--chunk-kib", "2", "--limit-kib-s", "12")
    kill_points = [size // 4, (3 * size) // 4]
    previous = 0
    for i, at in enumerate(kill_points):
        out = tmp_path / f"flash-{i}.log"
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda at=at: _part_size(device_v1) >= at, 90, f"{at} bytes copied", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        copied = _settled_part_size(device_v1)
        assert at <= copied < size
        if previous:
            assert f"resuming at {previous} of {size} B" in out.read_text()
        previous = copied
        _assert_runs(device_v1, bundles.v1, bundles.pubkey)  # the device never noticed
    report, log = _flash(sshd, bundles.v2, device_v1, known_hosts)
    assert report.outcome is flash_mod.FlashOutcome.FLASHED
    assert report.resumed_from_bytes == previous
    assert any(f"resuming at {previous} of {size} B" in line for line in log)
    _assert_runs(device_v1, bundles.v2, bundles.pubkey)
    assert _incoming(device_v1) == []


def _crashing_edgeglm(tmp_path: Path, state: str) -> Path:
    """A device-side ``edgeglm`` whose next ``edge install`` is SIGKILLed right after saving ``state``."""
    once = tmp_path / "crash-once"
    once.write_text(state)
    wrapper = tmp_path / "edgeglm-crashing"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = install ] && [ -f {once} ]; then\n'
        f"  EDGEGLM_CRASH_AT=$(cat {once}); export EDGEGLM_CRASH_AT; rm -f {once}\n"
        "fi\n"
        f'exec {REMOTE_EDGEGLM} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize(
    "state",
    [
        pytest.param("installing", marks=pytest.mark.slow),
        pytest.param("health_check", marks=pytest.mark.slow),
        "probation",
    ],
)
def test_device_killed_during_install_rolls_back_and_next_flash_succeeds(
    state: str, sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path, tmp_path: Path
) -> None:
    remote = _crashing_edgeglm(tmp_path, state)
    with pytest.raises(FlashError) as err:
        _flash(sshd, bundles.v2, device_v1, known_hosts, remote=remote)
    assert "install failed" in err.value.message and "ended without a result" in err.value.message
    assert "back on its previous slot" in err.value.message
    assert state in [h["state"] for h in _state(device_v1)["history"]]
    _assert_runs(device_v1, bundles.v1, bundles.pubkey, state="rolled_back" if state == "probation" else "failed")

    report, log = _flash(sshd, bundles.v2, device_v1, known_hosts, remote=remote)
    assert report.outcome is flash_mod.FlashOutcome.FLASHED, log
    _assert_runs(device_v1, bundles.v2, bundles.pubkey)


@pytest.mark.slow
def test_flash_killed_during_install_leaves_a_verified_slot_and_next_flash_succeeds(
    sshd: SshServer, bundles: Bundles, device_v1: Path, known_hosts: Path, tmp_path: Path
) -> None:
    v2_id = Bundle.open(bundles.v2).bundle_id
    in_flight = {"verifying", "installing", "health_check"}

    def installing() -> bool:
        try:
            st = _state(device_v1)
        except (OSError, ValueError):
            return False
        return st["state"] in in_flight and (st.get("target") or {}).get("bundle_id") == v2_id

    with open(tmp_path / "flash.log", "wb") as f:
        argv = _flash_cli(sshd, bundles.v2, device_v1, known_hosts)
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(installing, 120, "the device to start installing", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The device-side install outlives its SSH client; wait until it stopped writing.
    _wait_for(lambda: _state(device_v1)["state"] not in in_flight | {"switching"}, 120, "the orphaned install")
    current = Bundle.open(device_v1 / "current")
    current.verify(device_v1 / "trusted.pub", device=PROFILE)  # complete and verified, whichever it is
    interrupted = _state(device_v1)["state"] == "probation"
    assert current.bundle_id == v2_id or not interrupted

    report, log = _flash(sshd, bundles.v2, device_v1, known_hosts)
    assert report.outcome is flash_mod.FlashOutcome.FLASHED, log
    if interrupted:  # never committed by its flash: rolled back first, then installed again
        assert any("interrupted install (state probation)" in line for line in log), log
    _assert_runs(device_v1, bundles.v2, bundles.pubkey)


# --- fleets -------------------------------------------------------------------------------------


def test_fleet_flashes_in_parallel_and_prints_a_summary(
    sshd: SshServer, bundles: Bundles, known_hosts: Path, tmp_path: Path
) -> None:
    roots = [_device_on(tmp_path, bundles.v1, bundles.pubkey, name=f"press-{i}") for i in (1, 2)]
    fleet = tmp_path / "fleet.toml"
    devices = "".join(
        f'[[device]]\nname = "press-{i}"\nto = "root@127.0.0.1"\nport = {sshd.port}\n'
        f'identity = "{sshd.user_key}"\ndevice_root = "{root}"\n\n'
        for i, root in zip((1, 2), roots, strict=True)
    )
    devices += (
        f'[[device]]\nname = "press-9"\nto = "root@127.0.0.1:{sshd.port}"\nidentity = "{sshd.user_key}"\n'
        f'device_root = "{tmp_path / "press-9"}"\nremote_edgeglm = "/nonexistent/edgeglm"\n'
    )
    fleet.write_text(f"schema_version = 1\n\n{devices}")
    argv = [str(EDGEGLM), "flash", str(bundles.v2), "--fleet", str(fleet), "--parallel", "2"]
    argv += ["--known-hosts", str(known_hosts), "--remote-edgeglm", str(REMOTE_EDGEGLM)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == FlashError.exit_code, done.stdout + done.stderr
    table = done.stdout[done.stdout.index("DEVICE") :].splitlines()
    assert table[0].split() == ["DEVICE", "RESULT", "SECONDS", "REASON"]
    rows = {line.split()[0]: line for line in table[1:4]}
    assert rows["press-1"].split()[1] == "flashed" and rows["press-2"].split()[1] == "flashed"
    assert rows["press-9"].split()[1] == "failed" and "no '/nonexistent/edgeglm' command" in rows["press-9"]
    assert table[4] == "2 of 3 devices ok, 1 failed"
    for root in roots:
        _assert_runs(root, bundles.v2, bundles.pubkey)
