"""Flash a bundle onto a device over SSH (``edgeglm flash``), with resume and rollback.

The device installs with the same A/B slot state machine the OTA path uses
(:mod:`edgeglm.runtime.slots`, driven by ``edgeglm edge …`` on the device). This module drives
it from the workstation in explicit steps, each one logged::

    CONNECT   SSH with the --identity key only. The host key is checked against known_hosts:
              an unknown key is refused unless --accept-host-key records it (trust on first
              use); a changed key is always refused.
    CHECK     ``edge status``. An install a crash interrupted is recovered first (an
              uncommitted model never survives). The bundle must match the device's profile and
              arch (before provisioning: its ``uname -m``), must not be older than what runs,
              and must fit (free space ≥ 3 × bundle). The bundle that already runs: nothing to do.
    UPLOAD    SFTP to ``ROOT/incoming/<bundle id>.eglm.part`` in chunks, continuing from the
              .part's size (a killed or dropped copy resumes); sha256 checked on the device,
              then renamed to ``<bundle id>.eglm``.
    INSTALL   ``edge install --no-commit``: verify, extract into the inactive slot, golden-input
              health check, switch ``current`` atomically; stops in PROBATION. The first flash
              provisions the device (``--provision PROFILE --pubkey`` the key given by --pubkey).
    RESTART   restart the ``edgeglm-edge`` systemd unit if there is one; wait until active.
    COMMIT    ``edge commit``; the incoming file is deleted.

Any failure raises :class:`~edgeglm.errors.FlashError` naming the step and the reason (the
device's own reason when it refused the bundle). A failure after the install started first
puts the previous slot back: ``edge rollback`` from PROBATION, ``edge recover`` when the
install's outcome is unknown (connection lost, process killed).

The SSH side sits behind :class:`Transport` (run a command, upload a file from an offset, stat
a file), so the steps read as the procedure above. :class:`SSHTransport` is the asyncssh one.

Example::

    import asyncio
    from edgeglm.devices.flash import FlashOptions, Target, flash_device, local_bundle

    target = Target.parse("root@10.0.0.7", identity=Path("~/.ssh/fleet").expanduser())
    with local_bundle("dist/fd001-orin.eglm") as bundle:
        report = asyncio.run(flash_device(bundle, target, FlashOptions(pubkey=Path("keys/fleet.key.pub"))))
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import re
import shlex
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from edgeglm.bundle import BUNDLE_SUFFIXES, Bundle, normalize_arch
from edgeglm.errors import BundleError, ConfigError, FlashError

try:  # the compress extra installs asyncssh; say so when it is missing
    import asyncssh
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("edgeglm flash needs the 'asyncssh' package: pip install 'edgeglm[compress]'") from exc

__all__ = [
    "DEFAULT_DEVICE_ROOT",
    "DEFAULT_KNOWN_HOSTS",
    "FLEET_SCHEMA_VERSION",
    "SERVICE",
    "SPACE_FACTOR",
    "CommandResult",
    "FlashOptions",
    "FlashOutcome",
    "FlashReport",
    "FlashStep",
    "LocalBundle",
    "SSHTransport",
    "Target",
    "Transport",
    "flash_device",
    "flash_fleet",
    "format_summary",
    "load_fleet",
    "local_bundle",
]

DEFAULT_DEVICE_ROOT = "/opt/edgeglm"
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")
#: The systemd unit that runs the model on the device; restarted after the switch if present.
SERVICE = "edgeglm-edge"
#: The device needs this many times the bundle's size free: the upload, the extracted slot, slack.
SPACE_FACTOR = 3
FLEET_SCHEMA_VERSION = 1
_RUNTIME_HINT = (
    "install the runtime on the device (pip install 'edgeglm[runtime]'), or pass --remote-edgeglm "
    "with the absolute path of its edgeglm command (an SSH session's PATH is minimal)"
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Device states after which nothing is in flight (see edgeglm.runtime.slots).
_SETTLED = frozenset({"idle", "committed", "failed", "rolled_back"})

Log = Callable[[str], None]


# --- what and where ---------------------------------------------------------------------------


class FlashStep(str, Enum):
    """The steps of a flash, in order (see module doc); errors and logs name them."""

    CONNECT = "connect"
    CHECK = "check"
    UPLOAD = "upload"
    INSTALL = "install"
    RESTART = "restart"
    COMMIT = "commit"
    ROLLBACK = "rollback"


class FlashOutcome(str, Enum):
    """How a flash ended. Only ``FAILED`` is a failure."""

    FLASHED = "flashed"
    CURRENT = "already current"
    PLANNED = "planned"
    FAILED = "failed"

    @property
    def is_failure(self) -> bool:
        return self is FlashOutcome.FAILED


@dataclass(frozen=True)
class Target:
    """One device: who to log in as, where, with which key, and where EdgeGLM lives on it.

    Args:
        user: the SSH user (it must be able to write ``device_root`` and, if the device has the
            ``edgeglm-edge`` unit, to restart it).
        host: host name or address.
        identity: the private key to log in with (the only credential tried).
        port: SSH port (default: 22).
        device_root: the device's EdgeGLM root, holding the A/B slots (default: /opt/edgeglm).
        remote_edgeglm: the ``edgeglm`` command on the device (default: ``edgeglm`` on its PATH).
        name: a label for logs and the fleet summary (default: ``user@host[:port]``).
    """

    user: str
    host: str
    identity: Path
    port: int = 22
    device_root: str = DEFAULT_DEVICE_ROOT
    remote_edgeglm: str = "edgeglm"
    name: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"SSH port {self.port} is out of range", hint="pass a port between 1 and 65535")
        if not self.device_root.startswith("/"):
            raise ConfigError(
                f"device root {self.device_root!r} is not absolute", hint="pass an absolute path, e.g. /opt/edgeglm"
            )

    @classmethod
    def parse(cls, spec: str, *, identity: Path, port: int | None = None, **fields: Any) -> Target:
        """A target from ``user@host[:port]`` (``[v6addr]:port`` for IPv6; user defaults to the local one)."""
        user, _, hostport = spec.rpartition("@")
        m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:@\s]+)(?::(?P<p>\d+))?", hostport)
        if not m:
            raise ConfigError(f"cannot read the target {spec!r}", hint="write it as user@host or user@host:port")
        host = m["h6"] or m["h"]
        spec_port = m["p6"] or m["p"]
        return cls(
            user=user or getpass.getuser(),
            host=host,
            identity=Path(identity).expanduser(),
            port=port if port is not None else int(spec_port or 22),
            **fields,
        )

    @property
    def label(self) -> str:
        return self.name or f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class FlashOptions:
    """How to flash (the same for every device of a fleet).

    Args:
        pubkey: the public key a not-yet-provisioned device will trust (its first flash needs
            it). When given, the bundle is also verified with it before anything is copied.
        known_hosts: the known_hosts file (default: ``~/.ssh/known_hosts``).
        accept_host_key: trust and record an unknown host key (never a changed one).
        dry_run: run the checks and report the plan; change nothing on the device.
        chunk_bytes: SFTP write size; the copy resumes at a chunk boundary (default: 256 KiB).
        limit_bytes_per_s: cap the copy's rate, for thin links (default: no cap).
        connect_timeout_s: SSH connection timeout (default: 15 s).
        command_timeout_s: timeout of short device commands (default: 120 s).
        install_timeout_s: timeout of ``edge install``, which runs the health check and, on
            Jetson, may build a TensorRT engine (default: 900 s).
        service_timeout_s: how long to wait for the restarted unit to be active (default: 60 s).
    """

    pubkey: Path | None = None
    known_hosts: Path | None = None
    accept_host_key: bool = False
    dry_run: bool = False
    chunk_bytes: int = 256 * 1024
    limit_bytes_per_s: float | None = None
    connect_timeout_s: float = 15.0
    command_timeout_s: float = 120.0
    install_timeout_s: float = 900.0
    service_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ConfigError(f"chunk size {self.chunk_bytes} B is not positive", hint="e.g. --chunk-kib 256")
        if self.limit_bytes_per_s is not None and self.limit_bytes_per_s <= 0:
            raise ConfigError(f"rate limit {self.limit_bytes_per_s} B/s is not positive", hint="e.g. --limit-kib-s 512")

    @property
    def known_hosts_path(self) -> Path:
        return (self.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()


@dataclass(frozen=True)
class FlashReport:
    """What a flash did: outcome, seconds, and the plan (dry run) or the reason (failure)."""

    target: str
    outcome: FlashOutcome
    bundle_id: str
    seconds: float
    reason: str = ""
    plan: tuple[str, ...] = ()
    resumed_from_bytes: int = 0
    health: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalBundle:
    """The bundle as it travels: its single-file form, size and sha256, and the parsed bundle."""

    bundle: Bundle
    path: Path
    size_bytes: int
    sha256: str

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id


@contextlib.contextmanager
def local_bundle(path: Path | str) -> Iterator[LocalBundle]:
    """Open a bundle for flashing; a folder bundle is packed to the single-file form (a temp file).

    Packing is deterministic, so packing the same folder again gives the same bytes and an
    interrupted upload of it can resume.
    """
    path = Path(path)
    bundle = Bundle.open(path)
    with tempfile.TemporaryDirectory(prefix="edgeglm-flash-") as tmp:
        if path.is_file() and path.name.endswith(BUNDLE_SUFFIXES):
            single = path
        else:
            single = Path(tmp) / f"{bundle.bundle_id}.eglm"
            single.write_bytes(bundle.to_archive_bytes())
        data = single.read_bytes()
        yield LocalBundle(bundle, single, len(data), hashlib.sha256(data).hexdigest())


# --- the transport ----------------------------------------------------------------------------


class CommandResult(NamedTuple):
    """A finished device command: exit status (negative signal number if killed), output."""

    rc: int
    stdout: str
    stderr: str


class Transport(Protocol):
    """What a flash needs from the link to the device (SSH in practice, see :class:`SSHTransport`)."""

    async def run(self, command: str, *, timeout_s: float) -> CommandResult:
        """Run a shell command on the device."""
        ...

    async def put(
        self,
        local: Path,
        remote: str,
        offset: int,
        *,
        chunk_bytes: int,
        on_chunk: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        """Write ``local[offset:]`` into ``remote`` at ``offset`` (created if missing, never
        truncated), ``chunk_bytes`` at a time, awaiting ``on_chunk(bytes_written_so_far)`` after
        each; returns the remote size."""
        ...

    async def stat(self, remote: str) -> int | None:
        """Size of a remote file in bytes, or None if it does not exist."""
        ...

    async def close(self) -> None: ...


class SSHTransport:
    """:class:`Transport` over one asyncssh connection (commands on exec channels, files by SFTP)."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn
        self._sftp: asyncssh.SFTPClient | None = None

    @classmethod
    async def connect(cls, target: Target, options: FlashOptions, *, log: Log) -> SSHTransport:
        """Log in with ``target.identity`` only, after checking the host key (see module doc)."""
        identity = target.identity
        if not identity.is_file():
            raise FlashError(
                f"SSH identity {identity} does not exist",
                hint="pass --identity with the private key whose .pub is in the device's authorized_keys",
            )
        kh = options.known_hosts_path
        common: dict[str, Any] = {
            "port": target.port,
            "config": None,  # explicit and reproducible: ~/.ssh/config does not change what we do
            "connect_timeout": options.connect_timeout_s,
        }
        if _has_known_entry(kh, target.host, target.port):
            known_hosts: Any = str(kh)
            trust = f"host key checked against {kh}"
        else:
            key = await _probe_host_key(target, common)
            fingerprint = f"{key.get_algorithm()} {key.get_fingerprint()}"
            if not options.accept_host_key:
                raise FlashError(
                    f"the host key of {_host_port(target)} ({fingerprint}) is not in {kh}: unknown host",
                    hint="check that fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
                    "then pass --accept-host-key to trust it and record it in the known_hosts file",
                )
            if not options.dry_run:
                _record_host_key(kh, target.host, target.port, key)
            known_hosts = ([key], [], [])
            trust = f"new host key {fingerprint} accepted" + ("" if options.dry_run else f" and recorded in {kh}")
        try:
            conn = await asyncssh.connect(
                target.host,
                username=target.user,
                client_keys=[str(identity)],
                agent_path=None,
                preferred_auth="publickey",
                known_hosts=known_hosts,
                **common,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise FlashError(
                f"the host key of {_host_port(target)} CHANGED: it does not match its entry in {kh} ({exc.reason}); "
                "refusing to connect",
                hint="if the device was re-installed, remove the old key (ssh-keygen -R "
                f"{shlex.quote(_known_pattern(target.host, target.port))} -f {kh}) and flash again with "
                "--accept-host-key; otherwise someone may be intercepting the connection",
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise FlashError(
                f"{target.user}@{_host_port(target)} refused the key {identity}",
                hint=f"add {identity}.pub to ~{target.user}/.ssh/authorized_keys on the device",
            ) from exc
        except asyncssh.KeyImportError as exc:
            raise FlashError(
                f"cannot use the SSH identity {identity}: {exc}",
                hint="pass an unencrypted OpenSSH private key (a deploy key)",
            ) from exc
        except (OSError, asyncssh.Error) as exc:
            raise FlashError(
                f"cannot connect to {_host_port(target)}: {_describe(exc)}",
                hint="check the address and port, and that sshd runs on the device",
            ) from exc
        log(trust)
        return cls(conn)

    async def run(self, command: str, *, timeout_s: float) -> CommandResult:
        r = await self._conn.run(command, check=False, timeout=timeout_s)
        return CommandResult(_returncode(r), _text(r.stdout), _text(r.stderr))

    async def put(
        self,
        local: Path,
        remote: str,
        offset: int,
        *,
        chunk_bytes: int,
        on_chunk: Callable[[int], Awaitable[None]] | None = None,
    ) -> int:
        sftp = await self._sftp_client()
        size = local.stat().st_size
        pos = offset
        async with sftp.open(remote, asyncssh.FXF_WRITE | asyncssh.FXF_CREAT, encoding=None) as dst:
            with open(local, "rb") as src:
                src.seek(offset)
                while pos < size:
                    chunk = src.read(chunk_bytes)
                    await dst.write(chunk, pos)
                    pos += len(chunk)
                    if on_chunk is not None:
                        await on_chunk(pos)
        return pos

    async def stat(self, remote: str) -> int | None:
        sftp = await self._sftp_client()
        try:
            return (await sftp.stat(remote)).size
        except asyncssh.SFTPNoSuchFile:
            return None

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
        self._conn.close()
        with contextlib.suppress(asyncssh.Error, OSError):
            await self._conn.wait_closed()

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        if self._sftp is None:
            self._sftp = await self._conn.start_sftp_client()
        return self._sftp


def _host_port(target: Target) -> str:
    return target.host if target.port == 22 else f"{target.host}:{target.port}"


def _known_pattern(host: str, port: int) -> str:
    """How OpenSSH writes a host in known_hosts: ``host``, or ``[host]:port`` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def _has_known_entry(path: Path, host: str, port: int) -> bool:
    """Whether known_hosts says anything about this host (a key, a CA, a certificate)."""
    if not path.is_file():
        return False
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError) as exc:
        raise FlashError(f"cannot read the known_hosts file {path}: {exc}", hint="fix or move that file") from exc
    host_keys, ca_keys, _revoked, x509_certs, _revoked_x509, x509_subjects, _ = known.match(
        host, host, None if port == 22 else port
    )
    return bool(host_keys or ca_keys or x509_certs or x509_subjects)


async def _probe_host_key(target: Target, common: dict[str, Any]) -> asyncssh.SSHKey:
    """The server's host key, read in a key exchange without logging in."""
    try:
        key = await asyncio.wait_for(
            asyncssh.get_server_host_key(target.host, target.port, config=None), common["connect_timeout"]
        )
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        raise FlashError(
            f"cannot connect to {_host_port(target)}: {_describe(exc)}",
            hint="check the address and port, and that sshd runs on the device",
        ) from exc
    if key is None:
        raise FlashError(f"{_host_port(target)} sent no host key", hint="check the device's sshd configuration")
    return key


def _record_host_key(path: Path, host: str, port: int, key: asyncssh.SSHKey) -> None:
    """Append ``host key`` to known_hosts in OpenSSH's format (trust on first use)."""
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lead = "\n" if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n") else ""
    with open(path, "a") as f:
        f.write(f"{lead}{_known_pattern(host, port)} {algorithm} {blob}\n")


def _returncode(r: asyncssh.SSHCompletedProcess) -> int:
    if r.exit_status is not None and r.exit_status >= 0:
        return r.exit_status
    rc = getattr(r, "returncode", None)
    return rc if isinstance(rc, int) else -1


def _text(data: Any) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else str(data)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return "timed out"
    return str(exc) or type(exc).__name__


# --- the flash --------------------------------------------------------------------------------


def _sh(*argv: str) -> str:
    return shlex.join(argv)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _json(text: str) -> dict[str, Any] | None:
    """The JSON object a device command printed (its last line), or None."""
    for line in reversed(text.strip().splitlines()):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        return doc if isinstance(doc, dict) else None
    return None


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


class _Undo(Enum):
    """How to put the previous slot back after a failure."""

    ROLLBACK = "rollback"  # the install reached PROBATION: `edge rollback`
    RECOVER = "recover"  # the install's outcome is unknown (killed, link lost): `edge recover`


class _Flash:
    """One flash of one device: the steps of the module doc, in order."""

    def __init__(self, local: LocalBundle, target: Target, options: FlashOptions, log: Log) -> None:
        self.local = local
        self.target = target
        self.options = options
        self._log = log
        self.step = FlashStep.CONNECT
        self.plan: list[str] = []
        self.root = target.device_root.rstrip("/") or "/"
        self.incoming = f"{self.root}/incoming"
        self.final = f"{self.incoming}/{local.bundle_id}.eglm"
        self.part = self.final + ".part"
        self.pubkey_remote = f"{self.incoming}/trusted-{local.bundle_id[:16]}.pub"
        self.provisioned = True
        self.resumed_from = 0
        self.health: dict[str, Any] = {}
        # What a failure from here on must undo on the device (None: nothing is in flight).
        self.undo: _Undo | None = None
        self.restarted = False
        self.uploaded = False

    # --- plumbing ---------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self._log(f"[{self.target.label}] {self.step.value:<8} {text}")

    def enter(self, step: FlashStep, text: str = "") -> None:
        self.step = step
        if text:
            self.log(text)

    def edgeglm(self, *args: str) -> str:
        return _sh(self.target.remote_edgeglm, "edge", *args, "--root", self.root, "--json")

    async def run_edge(self, t: Transport, *args: str, timeout_s: float | None = None) -> tuple[CommandResult, dict]:
        """Run ``edgeglm edge ARGS --root R --json``; a missing command is an error with a hint."""
        r = await t.run(self.edgeglm(*args), timeout_s=timeout_s or self.options.command_timeout_s)
        if r.rc == 127:
            raise FlashError(
                f"the device has no {self.target.remote_edgeglm!r} command ({_tail(r.stderr, 1)})", hint=_RUNTIME_HINT
            )
        return r, _json(r.stdout) or {}

    async def must(self, t: Transport, command: str) -> CommandResult:
        r = await t.run(command, timeout_s=self.options.command_timeout_s)
        if r.rc != 0:
            raise FlashError(f"`{command}` failed on the device (exit {r.rc}): {_tail(r.stderr or r.stdout)}")
        return r

    def report(self, outcome: FlashOutcome, started: float, reason: str = "") -> FlashReport:
        return FlashReport(
            self.target.label,
            outcome,
            self.local.bundle_id,
            time.monotonic() - started,
            reason=reason,
            plan=tuple(self.plan),
            resumed_from_bytes=self.resumed_from,
            health=self.health,
        )

    # --- the procedure ----------------------------------------------------------------------
    async def run(self, connect: Callable[[Target, FlashOptions, Log], Awaitable[Transport]]) -> FlashReport:
        started = time.monotonic()
        t: Transport | None = None
        try:
            self.enter(FlashStep.CONNECT)
            t = await connect(self.target, self.options, self.log)
            status = await self.check(t)
            if status is None:
                return self.report(FlashOutcome.CURRENT, started, "already current")
            if self.options.dry_run:
                await self.make_plan(t)
                return self.report(FlashOutcome.PLANNED, started)
            await self.upload(t)
            if not await self.install(t):
                await self.cleanup(t)
                return self.report(FlashOutcome.CURRENT, started, "already current")
            await self.restart(t)
            await self.commit(t)
            await self.cleanup(t)
            return self.report(FlashOutcome.FLASHED, started)
        except FlashError as exc:
            raise await self.fail(t, exc.message, exc.hint) from exc
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            raise await self.fail(t, f"{type(exc).__name__}: {_describe(exc)}", None) from exc
        finally:
            if t is not None:
                await t.close()

    async def check(self, t: Transport) -> dict[str, Any] | None:
        """CHECK: the device's state and whether this bundle fits it; None if it already runs it."""
        self.enter(FlashStep.CHECK)
        m = self.local.bundle.manifest
        if self.options.pubkey is not None:
            try:
                self.local.bundle.verify(self.options.pubkey)
            except BundleError as exc:
                raise FlashError(
                    f"the bundle does not verify with {self.options.pubkey}: {exc.message}", hint=exc.hint
                ) from exc
        status = await self.status(t)
        if status["state"] not in _SETTLED:
            if self.options.dry_run:
                self.note(f"would recover the install a crash interrupted (device state {status['state']})")
            else:
                self.log(f"the device has an interrupted install (state {status['state']}): recovering it")
                r, doc = await self.run_edge(t, "recover")
                if r.rc != 0 or "state" not in doc:
                    raise FlashError(
                        f"`edge recover` failed on the device (exit {r.rc}): {_tail(r.stderr or r.stdout)}",
                        hint=f"see 'edgeglm edge status --root {self.root}' on the device",
                    )
                self.log(f"recovered: {doc['state']}")
                status = await self.status(t)
        device = status.get("device")
        cur = status.get("current")
        running = "no model" if not cur else f"{cur['name']} {cur['version']} (sequence {cur['sequence']})"
        if device:
            arch = str(device.get("arch") or status.get("arch") or "")
            self.note(f"device {device.get('profile')} ({arch}) runs {running}; last install {status['state']}")
            if device.get("profile") != m.profile:
                raise FlashError(
                    f"bundle built for device profile {m.profile!r}, the device is {device.get('profile')!r}",
                    hint=f"build one for it: edgeglm build COMPRESSED_DIR --device {device.get('profile')} "
                    "--key KEY --out BUNDLE",
                )
        else:
            self.provisioned = False
            arch = str(status.get("arch") or "") or (await self.must(t, "uname -m")).stdout.strip()
            self.note(f"device not provisioned yet ({arch}): this flash provisions it as {m.profile}")
            if self.options.pubkey is None:
                raise FlashError(
                    f"{self.root} on the device is not provisioned, and no key to trust was given",
                    hint="pass --pubkey KEY.pub (the public key of the bundle's signing key) on a device's first flash",
                )
        if normalize_arch(m.arch) != normalize_arch(arch):
            raise FlashError(
                f"bundle built for {m.arch} ({m.profile}), the device is {arch}",
                hint="build the bundle for this device's profile (see 'edgeglm devices')",
            )
        if cur and cur.get("bundle_id") == self.local.bundle_id and status["state"] in _SETTLED:
            self.note(f"the device already runs this bundle ({m.name} {m.version}): nothing to do")
            return None
        if cur and m.sequence < int(cur["sequence"]):
            raise FlashError(
                f"bundle sequence {m.sequence} ({m.name} {m.version}) is older than the device's {cur['sequence']} "
                f"({running}): downgrade refused",
                hint="build the model again with a higher --sequence to roll back on purpose",
            )
        free = int(status.get("free_bytes", 0))
        need = SPACE_FACTOR * self.local.size_bytes
        if free < need:
            raise FlashError(
                f"{_size(free)} free under {self.root}, {SPACE_FACTOR} × the bundle's {_size(self.local.size_bytes)} "
                "are needed",
                hint="free space on the device (old logs, caches), or build a smaller model",
            )
        self.note(f"bundle {m.name} {m.version} (sequence {m.sequence}) fits; {_size(free)} free")
        return status

    def note(self, text: str) -> None:
        self.plan.append(text)
        self.log(text)

    async def status(self, t: Transport) -> dict[str, Any]:
        r, doc = await self.run_edge(t, "status")
        if r.rc != 0 or "state" not in doc:
            raise FlashError(
                f"`edge status` failed on the device (exit {r.rc}): {_tail(r.stderr or r.stdout)}", hint=_RUNTIME_HINT
            )
        return doc

    async def make_plan(self, t: Transport) -> None:
        """Dry run: read what the copy would resume from and whether a unit would restart."""
        part = await self._stat_quiet(t, self.part)
        copy = f"resuming at {part} B" if part else "from the start"
        self.note(f"would upload {self.local.size_bytes} B to {self.final} ({copy}) and check its sha256")
        install = f"would run: {self.edgeglm('install', self.final, '--no-commit')}"
        if not self.provisioned:
            install += f" --provision {self.local.bundle.manifest.profile} --pubkey {self.pubkey_remote}"
        self.note(install)
        unit = await self.has_unit(t)
        self.note(f"would restart {SERVICE} and wait until active" if unit else f"no {SERVICE} unit: no restart")
        self.note(f"would run: {self.edgeglm('commit')}; delete {self.final}")
        self.note("dry run: nothing was changed on the device")

    async def _stat_quiet(self, t: Transport, path: str) -> int | None:
        try:
            return await t.stat(path)
        except (OSError, asyncssh.Error):
            return None

    async def upload(self, t: Transport) -> None:
        """UPLOAD: resume the .part, check the sha256 on the device, rename."""
        self.enter(FlashStep.UPLOAD)
        size = self.local.size_bytes
        await self.must(t, _sh("mkdir", "-p", self.incoming))
        if await t.stat(self.final) == size and await self.remote_sha256(t, self.final) == self.local.sha256:
            self.log(f"{self.final} is already on the device (sha256 ok)")
            self.uploaded = True
            return
        offset = await t.stat(self.part) or 0
        if offset > size:
            await self.must(t, _sh("rm", "-f", self.part))
            offset = 0
        for attempt in (1, 2):
            self.resumed_from = offset
            if offset:
                self.log(f"resuming at {offset} of {size} B ({self.part})")
            else:
                self.log(f"copying {size} B to {self.part}")
            await t.put(
                self.local.path,
                self.part,
                offset,
                chunk_bytes=self.options.chunk_bytes,
                on_chunk=self._pacer(offset),
            )
            digest = await self.remote_sha256(t, self.part)
            if digest == self.local.sha256:
                break
            if attempt == 2:
                raise FlashError(
                    f"the copy's sha256 on the device is {digest[:16]}…, the bundle's is {self.local.sha256[:16]}…",
                    hint="the link or the device's storage corrupts data; check it and flash again",
                )
            self.log(f"sha256 on the device {digest[:16]}… ≠ {self.local.sha256[:16]}…: copying again from 0")
            await self.must(t, _sh("rm", "-f", self.part))
            offset = 0
        await self.must(t, _sh("mv", "-f", self.part, self.final))
        self.uploaded = True
        self.log(f"sha256 ok; {self.final}")

    def _pacer(self, start: int) -> Callable[[int], Awaitable[None]]:
        """After each chunk: sleep as long as the rate limit asks (or just yield)."""
        began = time.monotonic()
        limit = self.options.limit_bytes_per_s

        async def pace(pos: int) -> None:
            wait = 0.0 if limit is None else (pos - start) / limit - (time.monotonic() - began)
            await asyncio.sleep(max(0.0, wait))

        return pace

    async def remote_sha256(self, t: Transport, path: str) -> str:
        q = shlex.quote(path)
        py = "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"
        command = f"sha256sum -- {q} 2>/dev/null || python3 -c {shlex.quote(py)} {q}"
        r = await t.run(command, timeout_s=self.options.command_timeout_s)
        digest = r.stdout.split()[0] if r.stdout.split() else ""
        if r.rc != 0 or not _HEX64.match(digest):
            raise FlashError(
                f"cannot compute the sha256 of {path} on the device (exit {r.rc}): {_tail(r.stderr)}",
                hint="the device needs sha256sum (coreutils) or python3",
            )
        return digest

    async def install(self, t: Transport) -> bool:
        """INSTALL: ``edge install --no-commit`` → PROBATION. False if the device already ran it."""
        self.enter(FlashStep.INSTALL)
        args = ["install", self.final, "--no-commit"]
        if not self.provisioned:
            assert self.options.pubkey is not None  # checked in CHECK
            await self.must(t, _sh("rm", "-f", self.pubkey_remote))
            await t.put(Path(self.options.pubkey), self.pubkey_remote, 0, chunk_bytes=self.options.chunk_bytes)
            args += ["--provision", self.local.bundle.manifest.profile, "--pubkey", self.pubkey_remote]
            self.log(f"provisioning as {self.local.bundle.manifest.profile}, trusting {self.options.pubkey.name}")
        self.undo = _Undo.RECOVER  # from here on the device may be mid-install if anything breaks
        r, doc = await self.run_edge(t, *args, timeout_s=self.options.install_timeout_s)
        state = doc.get("state")
        if state is None:
            raise FlashError(
                f"`edge install` ended without a result (exit {r.rc}): {_tail(r.stderr or r.stdout) or 'no output'}",
                hint="see 'edgeglm edge status' on the device",
            )
        self.health = dict(doc.get("health") or {})
        if state == "probation":
            self.undo = _Undo.ROLLBACK
            h = self.health
            detail = (
                f"health ok on {h.get('backend')} (max error {h.get('max_abs_error')}, {h.get('latency_ms', 0):.2f} ms)"
                if h
                else "health ok"
            )
            self.log(f"switched to slot {doc.get('slot')}, in probation; {detail}")
            return True
        if state in _SETTLED:  # the device reported its outcome: nothing in flight to undo
            self.undo = None
        if not doc.get("changed") and str(doc.get("reason", "")).startswith("already installed"):
            self.log("the device already runs this bundle")
            return False
        raise FlashError(
            f"the device refused the bundle: {doc.get('reason') or state}",
            hint="the device still runs its previous model; see 'edgeglm edge status' on it",
        )

    async def has_unit(self, t: Transport) -> bool:
        r = await t.run(f"systemctl cat {SERVICE} >/dev/null 2>&1", timeout_s=self.options.command_timeout_s)
        return r.rc == 0

    async def restart(self, t: Transport) -> None:
        """RESTART: the service picks the new ``current`` up; it must come back active."""
        self.enter(FlashStep.RESTART)
        if not await self.has_unit(t):
            self.log(f"no {SERVICE} systemd unit: nothing to restart")
            return
        self.restarted = True
        await self.must(t, _sh("systemctl", "restart", SERVICE))
        deadline = time.monotonic() + self.options.service_timeout_s
        while True:
            r = await t.run(_sh("systemctl", "is-active", SERVICE), timeout_s=self.options.command_timeout_s)
            state = r.stdout.strip()
            if state == "active":
                self.log(f"{SERVICE} is active")
                return
            if state == "failed" or time.monotonic() > deadline:
                raise FlashError(
                    f"{SERVICE} is {state or 'unknown'} after the restart (waited up to "
                    f"{self.options.service_timeout_s:.0f} s)",
                    hint=f"see 'journalctl -u {SERVICE}' on the device",
                )
            await asyncio.sleep(1.0)

    async def commit(self, t: Transport) -> None:
        """COMMIT: the model stays."""
        self.enter(FlashStep.COMMIT)
        r, doc = await self.run_edge(t, "commit")
        if r.rc != 0 or doc.get("state") != "committed":
            raise FlashError(f"`edge commit` failed (exit {r.rc}): {_tail(r.stderr or r.stdout)}")
        self.undo = None
        self.log("committed")

    async def cleanup(self, t: Transport) -> None:
        """Delete the incoming file (and the uploaded key); a failure here only gets logged."""
        try:
            await t.run(_sh("rm", "-f", self.final, self.pubkey_remote), timeout_s=self.options.command_timeout_s)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            self.log(f"could not delete {self.final}: {_describe(exc)}")

    async def fail(self, t: Transport | None, reason: str, hint: str | None) -> FlashError:
        """Undo what the failed step left (see module doc) and build the error to raise."""
        failed = self.step
        self.log(f"failed: {reason}")
        outcome = ""
        if self.undo is not None and t is not None:
            self.enter(FlashStep.ROLLBACK)
            outcome = await self._undo(t, f"flash {failed.value} failed: {reason}")
        elif failed in (FlashStep.CONNECT, FlashStep.CHECK, FlashStep.UPLOAD):
            outcome = "; the device was not changed"
        if self.uploaded and t is not None:
            await self.cleanup(t)
        hint = hint or "the device stays on its previous model; fix the cause and flash again"
        return FlashError(f"flash {self.target.label}: {failed.value} failed: {reason}{outcome}", hint=hint)

    async def _undo(self, t: Transport, reason: str) -> str:
        try:
            if self.undo is _Undo.ROLLBACK:
                r, doc = await self.run_edge(t, "rollback", "--reason", reason)
            else:
                r, doc = await self.run_edge(t, "recover")
            if self.restarted:
                await t.run(_sh("systemctl", "restart", SERVICE), timeout_s=self.options.command_timeout_s)
        except (FlashError, OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            msg = exc.message if isinstance(exc, FlashError) else _describe(exc)
            self.log(f"could not roll back: {msg}")
            return (
                f"; rolling back failed too ({msg}): run 'edgeglm edge recover --root {self.root}' on the device, "
                "which puts the previous slot back"
            )
        if r.rc != 0 or "state" not in doc:
            msg = f"`edge {self.undo.value}` exited {r.rc}: {_tail(r.stderr or r.stdout)}"
            self.log(f"could not roll back: {msg}")
            return f"; rolling back failed too ({msg}): see 'edgeglm edge status --root {self.root}' on the device"
        self.log(f"device state after undo: {doc['state']}")
        return f"; the device is back on its previous slot (state {doc['state']})"


async def _ssh_connect(target: Target, options: FlashOptions, log: Log) -> Transport:
    return await SSHTransport.connect(target, options, log=log)


def _print_log(line: str) -> None:
    print(line, flush=True)


async def flash_device(
    local: LocalBundle,
    target: Target,
    options: FlashOptions,
    *,
    log: Log = _print_log,
    connect: Callable[[Target, FlashOptions, Log], Awaitable[Transport]] = _ssh_connect,
) -> FlashReport:
    """Flash one device (see module doc). Returns the report; raises FlashError on failure.

    Args:
        local: the bundle, from :func:`local_bundle`.
        target: the device.
        options: how to flash.
        log: gets one line per step event (default: print).
        connect: opens the :class:`Transport` (default: :meth:`SSHTransport.connect`).
    """
    return await _Flash(local, target, options, log).run(connect)


async def flash_fleet(
    local: LocalBundle,
    targets: Sequence[Target],
    options: FlashOptions,
    *,
    parallel: int = 4,
    log: Log = _print_log,
    connect: Callable[[Target, FlashOptions, Log], Awaitable[Transport]] = _ssh_connect,
) -> list[FlashReport]:
    """Flash many devices, at most ``parallel`` at a time; a failure is a report, not an exception."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel} is not positive", hint="e.g. --parallel 4")
    gate = asyncio.Semaphore(parallel)

    async def one(target: Target) -> FlashReport:
        async with gate:
            started = time.monotonic()
            try:
                return await flash_device(local, target, options, log=log, connect=connect)
            except FlashError as exc:
                reason = exc.message.removeprefix(f"flash {target.label}: ")
                return FlashReport(
                    target.label, FlashOutcome.FAILED, local.bundle_id, time.monotonic() - started, reason=reason
                )

    return list(await asyncio.gather(*(one(t) for t in targets)))


def format_summary(reports: Sequence[FlashReport]) -> str:
    """The fleet summary: one row per device (device, result, seconds, reason)."""
    rows = [("DEVICE", "RESULT", "SECONDS", "REASON")]
    rows += [(r.target, r.outcome.value, f"{r.seconds:.1f}", r.reason) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip() for row in rows]
    failed = sum(r.outcome.is_failure for r in reports)
    lines.append(f"{len(reports) - failed} of {len(reports)} devices ok" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


_FLEET_KEYS = {"to", "identity", "port", "device_root", "remote_edgeglm", "name"}


def load_fleet(
    path: Path | str, *, device_root: str = DEFAULT_DEVICE_ROOT, remote_edgeglm: str = "edgeglm"
) -> list[Target]:
    """Read a fleet file; ``device_root`` and ``remote_edgeglm`` are the defaults a device may override.

    The file (TOML; relative identity paths are relative to it)::

        schema_version = 1

        [[device]]
        to = "root@10.0.0.7"            # user@host[:port]
        identity = "keys/deploy"        # SSH private key
        port = 2222                     # optional; overrides a port in `to`
        device_root = "/opt/edgeglm"    # optional
        remote_edgeglm = "/usr/local/bin/edgeglm"   # optional
        name = "press-07"               # optional label for the summary
    """
    from edgeglm.tomlfile import read_toml

    path = Path(path)
    doc = read_toml(path, what="fleet file", hint="pass --fleet FILE")
    if doc.get("schema_version") != FLEET_SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: fleet schema_version {doc.get('schema_version')!r}, this EdgeGLM reads {FLEET_SCHEMA_VERSION}",
            hint=f"put schema_version = {FLEET_SCHEMA_VERSION} at the top of the file",
        )
    extra = sorted(set(doc) - {"schema_version", "device"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level keys {', '.join(extra)}", hint="the file has [[device]] tables")
    devices = doc.get("device")
    if not isinstance(devices, list) or not devices:
        raise ConfigError(f"{path} lists no devices", hint='add [[device]] tables with to = "user@host" and identity')
    targets = []
    for i, d in enumerate(devices, 1):
        unknown = sorted(set(d) - _FLEET_KEYS)
        if unknown:
            raise ConfigError(
                f"{path}: device {i} has unknown keys {', '.join(unknown)}",
                hint=f"allowed: {', '.join(sorted(_FLEET_KEYS))}",
            )
        missing = [k for k in ("to", "identity") if not d.get(k)]
        if missing:
            raise ConfigError(f"{path}: device {i} lacks {', '.join(missing)}", hint="add to = and identity =")
        port = d.get("port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
            raise ConfigError(f"{path}: device {i} port {port!r} is not an integer", hint="e.g. port = 22")
        identity = Path(str(d["identity"])).expanduser()
        targets.append(
            Target.parse(
                str(d["to"]),
                identity=identity if identity.is_absolute() else path.parent / identity,
                port=port,
                device_root=str(d.get("device_root", device_root)),
                remote_edgeglm=str(d.get("remote_edgeglm", remote_edgeglm)),
                name=str(d.get("name", "")),
            )
        )
    return targets
