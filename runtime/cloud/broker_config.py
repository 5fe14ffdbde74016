"""A Mosquitto configuration for a fleet (``edgeglm broker config``): per-node credentials and ACL.

Every node logs in with its own name as username, and the ACL lets it read and write only its
own topics; the cloud daemons log in as one cloud user that reads and writes every node's::

    user edgeglm-cloud
    topic readwrite edgeglm/v1/#
    pattern readwrite edgeglm/v1/%u/#       # %u = the username = the node name

so node A cannot publish as node B (the broker drops it: MQTT 5 answers "Not authorized",
MQTT 3.1.1 acknowledges and discards) nor read B's acks and twin. The cloud daemon checks in
addition that an envelope's ``node`` is the node of its topic.

The cloud's **share group is a secret** (``edgeglm-cloud-<random>``, generated once and kept in
``credentials.toml``): Mosquitto's ACL file does not stop a client from *subscribing* to
``$share/GROUP/edgeglm/v1/+/telemetry``; it only filters delivery. A node that joined the
cloud's group would be handed its turn of every other node's messages, which the read check
then discards: the cloud would miss part of the fleet's traffic (the edges retransmit, but
throughput drops with every such subscription). A group name nodes do not know keeps them out.

The input is a fleet TOML::

    schema_version = 1

    [broker]
    user = "mosquitto"            # the account Mosquitto runs as (default: mosquitto)

    [[listener]]                  # default: one plain listener on port 1883, all interfaces
    port = 8883
    cafile = "/etc/mosquitto/ca.pem"
    certfile = "/etc/mosquitto/server.crt"
    keyfile = "/etc/mosquitto/server.key"

    [cloud]
    username = "edgeglm-cloud"    # default
    # share_group = "…"           # default: edgeglm-cloud-<random>, kept across runs

    [[node]]
    name = "press-07"             # optional: password = "…" (else one is generated)
    [[node]]
    name = "press-08"

The output folder gets ``mosquitto.conf`` (persistence on, no anonymous access),
``passwords`` (PBKDF2-SHA512 hashes, Mosquitto 2's ``$7$`` format), ``acl``,
``credentials.toml`` (the plain passwords to hand to each node and, with the share group, to the
cloud config; mode 0600) and ``data/`` (persistence). Re-running after adding a node keeps the passwords that
``credentials.toml`` already holds, so only the new node needs provisioning.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeglm.atomic import atomic_write_bytes
from edgeglm.errors import ConfigError, EdgeGLMError
from edgeglm.protocol import SHARE_GROUP, Topics, check_node_name

__all__ = [
    "FLEET_SCHEMA_VERSION",
    "BrokerFiles",
    "FleetSpec",
    "ListenerSpec",
    "NodeCredential",
    "hash_password",
    "load_fleet",
    "write_broker_config",
]

FLEET_SCHEMA_VERSION = 1
DEFAULT_CLOUD_USER = "edgeglm-cloud"
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
_SALT_BYTES = 12
_ACCOUNT_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = _PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``.

    The same format ``mosquitto_passwd`` writes (12-byte random salt, 101 iterations, 64-byte key),
    used when that tool is not installed.
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def _check_password(password: Any, who: str) -> str:
    if not isinstance(password, str) or not password or any(c in password for c in "\r\n\0"):
        raise ConfigError(
            f"fleet: the password of {who} must be a non-empty single-line string",
            hint="remove it to have one generated",
        )
    return password


@dataclass(frozen=True)
class NodeCredential:
    """A broker user: a node (or the cloud user) and its password (``None``: generate one)."""

    name: str
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            check_node_name(self.name)
        except EdgeGLMError as exc:
            raise ConfigError(f"fleet: {exc.message}", hint=exc.hint) from None
        if self.password is not None:
            _check_password(self.password, self.name)


@dataclass(frozen=True)
class ListenerSpec:
    """One ``[[listener]]``: a port, an optional bind address and optional TLS files (all three or none)."""

    port: int = 1883
    bind: str | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"fleet: listener.port = {self.port!r}; valid: 1..65535", hint="e.g. 8883 with TLS")
        tls = [self.cafile, self.certfile, self.keyfile]
        if any(tls) and not all(tls):
            raise ConfigError(
                "fleet: a TLS listener needs cafile, certfile and keyfile together",
                hint="set all three, or none for a plain listener",
            )
        if self.require_certificate and not all(tls):
            raise ConfigError("fleet: listener.require_certificate needs a TLS listener", hint="set the TLS files")

    @property
    def tls(self) -> bool:
        return self.certfile is not None


@dataclass(frozen=True)
class FleetSpec:
    """What ``edgeglm broker config`` reads: the nodes, the cloud user, listeners, the broker account.

    Args:
        nodes: one :class:`NodeCredential` per node (names unique, not the cloud user's).
        cloud: the cloud daemons' user (default: ``edgeglm-cloud``).
        listeners: default one plain listener on 1883.
        broker_user: the account Mosquitto drops to when started as root (default ``mosquitto``;
            ``root`` keeps root, e.g. in tests).
        share_group: the cloud daemons' shared-subscription group (default: the one
            ``credentials.toml`` holds, else a new ``edgeglm-cloud-<random>``); keep it secret.
        max_queued_messages: messages the broker queues per offline persistent session (default 10000).
        schema_version: layout of the fleet file (1).
    """

    nodes: tuple[NodeCredential, ...]
    cloud: NodeCredential = field(default_factory=lambda: NodeCredential(DEFAULT_CLOUD_USER))
    listeners: tuple[ListenerSpec, ...] = (ListenerSpec(),)
    broker_user: str = "mosquitto"
    max_queued_messages: int = 10000
    share_group: str | None = None
    schema_version: int = FLEET_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != FLEET_SCHEMA_VERSION:
            raise ConfigError(
                f"fleet: schema_version = {self.schema_version!r}; this EdgeGLM reads {FLEET_SCHEMA_VERSION}",
                hint=f"write schema_version = {FLEET_SCHEMA_VERSION}",
            )
        if not self.nodes:
            raise ConfigError("fleet: no [[node]] entries", hint='add [[node]] name = "press-07" for each node')
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"fleet: node {dup[0]} is listed twice", hint="node names are broker usernames: unique")
        if self.cloud.name in names:
            raise ConfigError(
                f"fleet: node {self.cloud.name} has the cloud user's name",
                hint="rename the node, or set [cloud] username to another name",
            )
        ports = [x.port for x in self.listeners]
        if not ports or len(set(ports)) != len(ports):
            raise ConfigError(f"fleet: listener ports {ports} must be given and distinct", hint="one port per listener")
        if not isinstance(self.broker_user, str) or not _ACCOUNT_RE.match(self.broker_user):
            raise ConfigError(f"fleet: broker.user = {self.broker_user!r}; valid: an account name", hint="mosquitto")
        g = self.share_group
        if g is not None and (not isinstance(g, str) or not _GROUP_RE.match(g)):
            raise ConfigError(
                f"fleet: cloud.share_group = {g!r}; valid: letters, digits, '.', '_', '-'",
                hint="or leave it out to have a secret one generated",
            )
        q = self.max_queued_messages
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            raise ConfigError(f"fleet: broker.max_queued_messages = {q!r}; valid: an integer ≥ 0", hint="e.g. 10000")


def _known(doc: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(
            f"fleet: unknown key {where}{unknown[0]}; known: {', '.join(sorted(known))}", hint="fix the key"
        )


def load_fleet(path: Path | str) -> FleetSpec:
    """Read a fleet TOML (see the module docstring); relative TLS paths are relative to it.

    Raises:
        ConfigError: missing file, bad TOML, unknown key, invalid or duplicate name, bad port.
    """
    from edgeglm.tomlfile import read_toml

    path = Path(path)
    doc = read_toml(path, what="fleet file", hint='write [[node]] name = "press-07" per node')
    base = path.resolve().parent
    _known(doc, {"schema_version", "broker", "listener", "cloud", "node"}, "")

    def table(x: Any, key: str) -> dict[str, Any]:
        if not isinstance(x, dict):
            raise ConfigError(f"fleet: {key} must be a table", hint=f"write [{key}] or [[{key}]]")
        return x

    nodes = []
    for n in doc.get("node", []):
        n = table(n, "node")
        _known(n, {"name", "password"}, "node.")
        if "name" not in n:
            raise ConfigError("fleet: a [[node]] has no name", hint='add name = "press-07"')
        nodes.append(NodeCredential(n["name"], n.get("password")))
    c = table(doc.get("cloud", {}), "cloud")
    _known(c, {"username", "password", "share_group"}, "cloud.")
    cloud = NodeCredential(c.get("username", DEFAULT_CLOUD_USER), c.get("password"))
    b = table(doc.get("broker", {}), "broker")
    _known(b, {"user", "max_queued_messages"}, "broker.")
    listeners = []
    for x in doc.get("listener", [{}]):
        x = dict(table(x, "listener"))
        _known(x, {"port", "bind", "cafile", "certfile", "keyfile", "require_certificate"}, "listener.")
        for k in ("cafile", "certfile", "keyfile"):
            if k in x:
                p = Path(str(x[k])).expanduser()
                x[k] = p if p.is_absolute() else base / p
        listeners.append(ListenerSpec(**x))
    return FleetSpec(
        nodes=tuple(nodes),
        cloud=cloud,
        listeners=tuple(listeners),
        broker_user=b.get("user", "mosquitto"),
        max_queued_messages=b.get("max_queued_messages", 10000),
        share_group=c.get("share_group"),
        schema_version=doc.get("schema_version", FLEET_SCHEMA_VERSION),
    )


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote; ``hashed_with``: ``mosquitto_passwd`` or ``edgeglm``.

    ``share_group``: what the daemons' ``cloud.toml`` must set as ``share_group``.

    ``owner``: the account the password file, ACL and data folder were handed to (``None``: left as is).
    """

    conf: Path
    passwords: Path
    acl: Path
    credentials: Path
    data_dir: Path
    hashed_with: str
    owner: str | None
    generated: tuple[str, ...]
    share_group: str


def _previous_credentials(path: Path) -> tuple[dict[str, str], str | None]:
    """Passwords by user name and the share group of an earlier run."""
    if not path.is_file():
        return {}, None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"cannot read the previous credentials {path}: {exc}",
            hint="fix or remove it (removing it generates new passwords for every node)",
        ) from exc
    out = {}
    for entry in [doc.get("cloud", {}), *doc.get("node", [])]:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("password"), str):
            out[entry["name"]] = entry["password"]
    group = doc.get("cloud", {}).get("share_group")
    return out, group if isinstance(group, str) and _GROUP_RE.match(group) else None


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_path(p: Path) -> Path:
    if any(c.isspace() for c in str(p)):
        raise ConfigError(f"output path {p} contains whitespace, which mosquitto.conf cannot express", hint="move it")
    return p


def _hash_file(users: list[tuple[str, str]], dest: Path, tool: str | None) -> str:
    """Write the password file at ``dest`` (mode 0600); return which hasher wrote it."""
    if tool is not None:
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:  # plain text, hashed in place by -U: no password on a command line
            f.write("".join(f"{u}:{p}\n" for u, p in users))
        try:
            proc = subprocess.run([tool, "-U", str(tmp)], capture_output=True, text=True, timeout=60)
            lines = tmp.read_text().splitlines()
            ok = proc.returncode == 0 and len(lines) == len(users)
            ok = ok and all(line.split(":", 1)[1].startswith(("$7$", "$6$")) for line in lines)
            if ok:
                os.replace(tmp, dest)
                return "mosquitto_passwd"
        finally:
            tmp.unlink(missing_ok=True)
    atomic_write_bytes(dest, "".join(f"{u}:{hash_password(p)}\n" for u, p in users).encode(), mode=0o600)
    return "edgeglm"


def _conf_text(fleet: FleetSpec, passwords: Path, acl: Path, data_dir: Path) -> str:
    lines = [
        "# Mosquitto configuration of an EdgeGLM fleet, written by `edgeglm broker config`.",
        f"# {len(fleet.nodes)} nodes log in with their own name and may only touch edgeglm/v1/<name>/#;",
        f"# the cloud user {fleet.cloud.name} reads and writes edgeglm/v1/# (its shared subscriptions",
        "# included; their group name is in credentials.toml: keep it secret). After adding nodes, run",
        "# the command again and send Mosquitto a SIGHUP: it re-reads the password file and the ACL.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwords}",
        f"acl_file {acl}",
        "",
        "# Nothing acknowledged is lost on a broker restart: messages and persistent sessions go to disk.",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 60",
        "# Sessions of clients gone for good (a replaced gateway) are dropped after a week.",
        "persistent_client_expiration 7d",
        f"max_queued_messages {fleet.max_queued_messages}",
        f"user {fleet.broker_user}",
    ]
    for x in fleet.listeners:
        lines += ["", f"listener {x.port}" + (f" {x.bind}" if x.bind else "")]
        if x.tls:
            lines += [
                f"cafile {_check_path(Path(x.cafile))}",  # type: ignore[arg-type]
                f"certfile {_check_path(Path(x.certfile))}",  # type: ignore[arg-type]
                f"keyfile {_check_path(Path(x.keyfile))}",  # type: ignore[arg-type]
            ]
            if x.require_certificate:
                lines.append("require_certificate true")
        else:
            lines.append("# plain TCP: passwords travel in clear; prefer a TLS listener (cafile/certfile/keyfile)")
    return "\n".join(lines) + "\n"


def _acl_text(fleet: FleetSpec) -> str:
    return "\n".join(
        [
            "# EdgeGLM fleet ACL, written by `edgeglm broker config`.",
            "# The cloud daemons read and write every node's topics (their shared subscriptions too).",
            f"user {fleet.cloud.name}",
            f"topic readwrite {Topics.prefix}/#",
            "",
            "# Every user, i.e. every node: only its own topics (%u is the username, which is the node name).",
            f"pattern readwrite {Topics.prefix}/%u/#",
            "",
        ]
    )


def _hand_over(paths: list[Path], user: str) -> str | None:
    """When run as root, give the broker's account the files it reads after dropping privileges."""
    if user == "root" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    for p in paths:
        os.chown(p, pw.pw_uid, pw.pw_gid)
    return user


def write_broker_config(fleet: FleetSpec, out_dir: Path | str, *, passwd_tool: str | None = "auto") -> BrokerFiles:
    """Write ``mosquitto.conf``, ``passwords``, ``acl``, ``credentials.toml`` and ``data/`` into ``out_dir``.

    Args:
        fleet: the :class:`FleetSpec` (see :func:`load_fleet`).
        out_dir: the folder to write (created if needed; absolute paths go into mosquitto.conf).
        passwd_tool: ``"auto"`` (default) uses ``mosquitto_passwd`` when installed, else EdgeGLM's
            own :func:`hash_password`; a path uses that tool; ``None`` always hashes in Python.

    Returns:
        :class:`BrokerFiles`, with the names whose passwords were generated now.

    Raises:
        ConfigError: the output path cannot be written into mosquitto.conf, or a previous
            ``credentials.toml`` is unreadable.
    """
    out = _check_path(Path(out_dir).expanduser().resolve())
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    conf, passwords, acl, creds = out / "mosquitto.conf", out / "passwords", out / "acl", out / "credentials.toml"
    previous, previous_group = _previous_credentials(creds)
    share_group = fleet.share_group or previous_group or f"{SHARE_GROUP}-{secrets.token_hex(8)}"
    users: list[tuple[str, str]] = []
    generated = []
    for cred in (fleet.cloud, *fleet.nodes):
        password = cred.password or previous.get(cred.name)
        if password is None:
            password = secrets.token_urlsafe(24)
            generated.append(cred.name)
        users.append((cred.name, password))
    if passwd_tool == "auto":
        passwd_tool = shutil.which("mosquitto_passwd")
    hashed_with = _hash_file(users, passwords, passwd_tool)
    atomic_write_bytes(acl, _acl_text(fleet).encode(), mode=0o600)
    atomic_write_bytes(conf, _conf_text(fleet, passwords, acl, data_dir).encode(), mode=0o644)
    cloud_name, cloud_pw = users[0]
    text = [
        "# Broker credentials of the EdgeGLM fleet, written by `edgeglm broker config`. Secret: mode 0600.",
        "# [cloud] goes into the daemons' cloud.toml ([broker] username/password, share_group);",
        "# each [[node]] to its gateway only.",
        "[cloud]",
        f"name = {_toml_str(cloud_name)}",
        f"password = {_toml_str(cloud_pw)}",
        f"share_group = {_toml_str(share_group)}",
    ]
    for name, pw in users[1:]:
        text += ["", "[[node]]", f"name = {_toml_str(name)}", f"password = {_toml_str(pw)}"]
    atomic_write_bytes(creds, ("\n".join(text) + "\n").encode(), mode=0o600)
    owner = _hand_over([passwords, acl, data_dir], fleet.broker_user)
    return BrokerFiles(conf, passwords, acl, creds, data_dir, hashed_with, owner, tuple(generated), share_group)
