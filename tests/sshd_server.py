"""A real OpenSSH server on 127.0.0.1 for flash tests and ``benchmarks/bundle.py``.

``sshd -D -e`` on a free port with a throwaway host key, key-only login for a throwaway user
key (as the current user), SFTP enabled; stopped by PID. Needs /usr/sbin/sshd and ssh-keygen
(``apt-get install openssh-server``; ``.ci/run`` does it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from brokers import free_port

__all__ = ["SSHD", "SSH_KEYGEN", "SshServer", "SshdError", "start_sshd"]

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = Path("/usr/bin/ssh-keygen")


class SshdError(RuntimeError):
    """sshd could not be started (missing, no privilege separation folder, or it exited)."""


@dataclass
class SshServer:
    port: int
    user_key: Path
    host_key_line: str  # "[127.0.0.1]:PORT ssh-ed25519 AAAA…", as known_hosts holds it
    folder: Path
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


def keygen(path: Path) -> None:
    subprocess.run([str(SSH_KEYGEN), "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def start_sshd(folder: Path) -> SshServer:
    """Start sshd with its keys and config in ``folder``; raise :class:`SshdError` if it cannot run."""
    if not SSHD.exists() or not SSH_KEYGEN.exists():
        raise SshdError("/usr/sbin/sshd and ssh-keygen are needed (apt-get install openssh-server)")
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege separation folder
    if not privsep.is_dir():
        if os.geteuid() != 0:
            raise SshdError("sshd needs /run/sshd, which is missing and cannot be created without root")
        privsep.mkdir(mode=0o755, parents=True)
    folder.mkdir(parents=True, exist_ok=True)
    keygen(folder / "host_key")
    keygen(folder / "user_key")
    (folder / "authorized_keys").write_text((folder / "user_key.pub").read_text())
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nMaxStartups 50\nMaxSessions 50\n"
    )
    with open(folder / "sshd.log", "wb") as log:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise SshdError(f"sshd exited ({proc.returncode}): {(folder / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SshdError(f"sshd did not accept connections on port {port}") from None
            time.sleep(0.05)
    algorithm, blob = (folder / "host_key.pub").read_text().split()[:2]
    return SshServer(port, folder / "user_key", f"[127.0.0.1]:{port} {algorithm} {blob}", folder, proc)
