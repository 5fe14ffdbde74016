"""A/B model slots on a device, installed through an explicit, persisted state machine.

The same code installs a bundle whether it arrived by ``edgeglm flash`` (SSH) or over the air
(MQTT): the copy differs, the install does not. Layout under the device root::

    ROOT/
      device.json     {"profile": "jetson-orin-nano-8gb", "arch": "aarch64"} (provisioned once)
      trusted.pub     the Ed25519 key bundles must be signed with
      slots/a/        an extracted, verified bundle
      slots/b/        the other one
      current -> slots/a
      state.json      the install state machine (below), written atomically before each step
      incoming/       bundles being copied in (``*.part`` until complete)

An install walks this graph; every state is saved (temp file, fsync, rename) *before* the work
of that state starts, so a process killed at any point leaves a state that :meth:`SlotStore.recover`
can finish safely. ``current`` changes only in ``SWITCHING`` (one atomic rename) and is only
made permanent by ``commit``::

    IDLE → VERIFYING → INSTALLING → HEALTH_CHECK → SWITCHING → PROBATION → COMMITTED
              │             │             │             │           │
              └─────────────┴─────────────┴──► FAILED   └───────────┴──► ROLLING_BACK → ROLLED_BACK

Failures before the switch leave ``current`` untouched (``FAILED``); failures after it point
``current`` back at the previous slot (``ROLLED_BACK``). Recovery after a kill: VERIFYING /
INSTALLING / HEALTH_CHECK → ``FAILED`` (the half-written inactive slot is discarded);
SWITCHING / PROBATION / ROLLING_BACK → roll back (an uncommitted model never survives a crash).
More than ``MAX_TRANSITIONS`` transitions in one install forces the rollback path.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgeglm.atomic import atomic_symlink, atomic_write_json, fsync_dir
from edgeglm.bundle import Bundle
from edgeglm.errors import BundleError, ConfigError, OtaError

__all__ = ["MAX_TRANSITIONS", "TRANSITIONS", "InstallResult", "SlotState", "SlotStore", "step"]

SCHEMA_VERSION = 1
MAX_TRANSITIONS = 16
#: Fault injection for tests: ``EDGEGLM_CRASH_AT=<state>`` SIGKILLs this process right after
#: that state is saved, which is exactly a power cut at that point.
CRASH_ENV = "EDGEGLM_CRASH_AT"


class SlotState(str, Enum):
    IDLE = "idle"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health_check"
    SWITCHING = "switching"
    PROBATION = "probation"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class SlotEvent(str, Enum):
    START = "start"
    SUCCESS = "success"
    FAILURE = "failure"


S, E = SlotState, SlotEvent
#: The whole graph in one table: (state, event) → next state.
TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (S.IDLE, E.START): S.VERIFYING,
    (S.COMMITTED, E.START): S.VERIFYING,
    (S.FAILED, E.START): S.VERIFYING,
    (S.ROLLED_BACK, E.START): S.VERIFYING,
    (S.VERIFYING, E.SUCCESS): S.INSTALLING,
    (S.VERIFYING, E.FAILURE): S.FAILED,
    (S.INSTALLING, E.SUCCESS): S.HEALTH_CHECK,
    (S.INSTALLING, E.FAILURE): S.FAILED,
    (S.HEALTH_CHECK, E.SUCCESS): S.SWITCHING,
    (S.HEALTH_CHECK, E.FAILURE): S.FAILED,
    (S.SWITCHING, E.SUCCESS): S.PROBATION,
    (S.SWITCHING, E.FAILURE): S.ROLLING_BACK,
    (S.PROBATION, E.SUCCESS): S.COMMITTED,
    (S.PROBATION, E.FAILURE): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.SUCCESS): S.ROLLED_BACK,
}
TERMINAL = frozenset({S.IDLE, S.COMMITTED, S.FAILED, S.ROLLED_BACK})


def step(state: SlotState, event: SlotEvent) -> SlotState:
    """The next state; a missing edge is a bug, not a device condition."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise OtaError(f"no transition from {state.value} on {event.value}") from None


@dataclass(frozen=True)
class InstallResult:
    """What an install did. ``changed`` is False for a no-op (the same bundle already runs)."""

    state: SlotState
    slot: str | None
    bundle_id: str
    version: str
    changed: bool
    reason: str = ""
    health: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["state"] = self.state.value
        return d


def _exclusive(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a state-changing method holding ``ROOT/.lock`` (``flock``): one installer per device.

    Two installers on one root (a flash whose SSH client died while its ``edge install`` still
    runs, and the next flash's ``edge recover``; or flash and OTA) would otherwise both rewrite
    ``state.json`` and the inactive slot. The second one waits. Re-entrant within one store.
    """

    @functools.wraps(method)
    def locked(self: SlotStore, *args: Any, **kwargs: Any) -> Any:
        if self._lock_fd is not None or not self.root.is_dir():
            return method(self, *args, **kwargs)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            return method(self, *args, **kwargs)
        finally:
            self._lock_fd = None
            os.close(fd)

    return locked


class SlotStore:
    """The A/B slots under ``root`` (see module doc)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.slots = self.root / "slots"
        self.incoming = self.root / "incoming"
        self.current_link = self.root / "current"
        self.state_path = self.root / "state.json"
        self._lock_fd: int | None = None

    # --- provisioning ---------------------------------------------------------------------
    def provision(self, *, profile: str, arch: str | None = None, trusted_key: bytes | None = None) -> None:
        """Create the layout, record which device this is and which key it trusts.

        Re-provisioning with a different profile or key is refused: that would let a bundle for
        another device, or from another signer, in.
        """
        for d in (self.root, self.slots, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        dev = {"profile": profile, "arch": arch or platform.machine()}
        path = self.root / "device.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("profile") != profile:
                raise ConfigError(
                    f"{self.root} is provisioned as {old.get('profile')!r}, not {profile!r}",
                    hint="flash a bundle built for that profile, or re-provision the device by hand",
                )
        else:
            atomic_write_json(path, dev)
        if trusted_key is not None:
            key_path = self.root / "trusted.pub"
            if key_path.is_file() and key_path.read_bytes() != trusted_key:
                raise ConfigError(
                    f"{self.root} trusts another signing key",
                    hint="sign with the device's key; replacing a device's trust anchor is a manual step",
                )
            if not key_path.is_file():
                from edgeglm.atomic import atomic_write_bytes

                atomic_write_bytes(key_path, trusted_key)

    @property
    def device(self) -> dict[str, Any]:
        path = self.root / "device.json"
        if not path.is_file():
            raise ConfigError(
                f"{self.root} is not provisioned (no device.json)",
                hint="flash it once with 'edgeglm flash', which provisions it",
            )
        return json.loads(path.read_text())

    @property
    def trusted_key(self) -> Path:
        return self.root / "trusted.pub"

    # --- state ----------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"schema_version": SCHEMA_VERSION, "state": S.IDLE.value, "transition_count": 0, "history": []}
        st = json.loads(self.state_path.read_text())
        if st.get("schema_version") != SCHEMA_VERSION:
            raise OtaError(
                f"{self.state_path}: state schema {st.get('schema_version')}, expected {SCHEMA_VERSION}",
                hint="this runtime is older than the one that wrote the state; upgrade it",
            )
        return st

    def _save(self, st: dict[str, Any], state: SlotState, **extra: Any) -> dict[str, Any]:
        st = {**st, **extra, "state": state.value, "transition_count": st.get("transition_count", 0) + 1}
        if state is S.COMMITTED and st.get("target"):
            st["committed"] = dict(st["target"])  # what open_current() accepts at every start
        hist = list(st.get("history", []))[-19:]
        hist.append(
            {"state": state.value, "t": time.time(), **({"reason": extra["reason"]} if "reason" in extra else {})}
        )
        st["history"] = hist
        atomic_write_json(self.state_path, st)
        if os.environ.get(CRASH_ENV) == state.value:
            os.kill(os.getpid(), signal.SIGKILL)
        return st

    def _advance(self, st: dict[str, Any], event: SlotEvent, **extra: Any) -> dict[str, Any]:
        nxt = step(SlotState(st["state"]), event)
        if st.get("transition_count", 0) >= MAX_TRANSITIONS and nxt not in (S.ROLLING_BACK, S.ROLLED_BACK, S.FAILED):
            nxt = S.ROLLING_BACK if SlotState(st["state"]) in (S.SWITCHING, S.PROBATION) else S.FAILED
            extra["reason"] = f"more than {MAX_TRANSITIONS} transitions: loop stopped"
        return self._save(st, nxt, **extra)

    # --- slots ----------------------------------------------------------------------------
    def current_slot(self) -> str | None:
        """``"a"`` or ``"b"`` (what ``current`` points at), or None before the first install."""
        if not self.current_link.is_symlink():
            return None
        return Path(os.readlink(self.current_link)).name

    def inactive_slot(self) -> str:
        return "b" if self.current_slot() == "a" else "a"

    def slot_bundle(self, slot: str | None) -> Bundle | None:
        if slot is None or not (self.slots / slot / "manifest.json").is_file():
            return None
        try:
            return Bundle.open(self.slots / slot)
        except BundleError:
            return None

    def current_bundle(self) -> Bundle | None:
        return self.slot_bundle(self.current_slot())

    def open_current(self) -> Bundle:
        """The running bundle, checked the way a device start checks it.

        The signature was verified when the bundle was installed; at start the runtime checks
        that ``current`` is the bundle the last install *committed* (its manifest's sha256 is
        recorded in ``state.json``), that every file still matches the manifest, and that it is
        for this device. That needs only hashlib — the long-running process never loads the
        signature library (≈ 13 MB of RSS).
        """
        from edgeglm.errors import DeviceMismatch, HashMismatch

        bundle = self.current_bundle()
        if bundle is None:
            raise OtaError(f"{self.root} runs no model yet", hint="install one: edgeglm edge install BUNDLE (or flash)")
        committed = (self.load_state().get("committed") or {}).get("bundle_id")
        if committed != bundle.bundle_id:
            raise HashMismatch(
                f"slot {self.current_slot()} holds bundle {bundle.bundle_id[:16]}…, but the last committed install "
                f"was {str(committed)[:16]}…: the slot was changed outside 'edgeglm edge install'",
                hint="re-install the bundle with 'edgeglm edge install' (or flash it again)",
            )
        bundle.verify_files()
        dev = self.device
        if bundle.manifest.profile != dev.get("profile"):
            raise DeviceMismatch(
                f"current bundle is for {bundle.manifest.profile!r}, this device is {dev.get('profile')!r}",
                hint="install a bundle built for this device",
            )
        return bundle

    def status(self) -> dict[str, Any]:
        """What runs and what the last install did (for ``edgeglm edge status`` and flash's checks)."""
        st = self.load_state()
        cur = self.current_bundle()
        usage = shutil.disk_usage(self.root if self.root.exists() else self.root.parent)
        dev = json.loads((self.root / "device.json").read_text()) if (self.root / "device.json").is_file() else None
        from edgeglm import __version__

        return {
            "root": str(self.root),
            "device": dev,
            "arch": platform.machine(),
            "runtime_version": __version__,
            "free_bytes": usage.free,
            "current_slot": self.current_slot(),
            "current": None
            if cur is None
            else {
                "bundle_id": cur.bundle_id,
                "name": cur.manifest.name,
                "version": cur.manifest.version,
                "sequence": cur.manifest.sequence,
                "profile": cur.manifest.profile,
            },
            "state": st["state"],
            "last_reason": st.get("reason", ""),
            "target": st.get("target"),
        }

    # --- the install ----------------------------------------------------------------------
    @_exclusive
    def install(
        self, bundle_path: Path | str, *, backend: str | None = None, commit: bool = True, health_runs: int = 20
    ) -> InstallResult:
        """Verify, install into the inactive slot, health-check, switch; commit unless ``commit=False``.

        With ``commit=False`` the install stops in ``PROBATION``: the new model is ``current``
        but :meth:`commit` (after the service reports healthy) or :meth:`rollback` decides.
        Returns the result; failures are results too (``state`` FAILED / ROLLED_BACK with a
        ``reason``), because a failed install that restored the previous model is an outcome the
        caller reports, not a crash.
        """
        self.recover()
        dev = self.device
        bundle = Bundle.open(bundle_path)
        cur = self.current_bundle()
        if cur is not None and cur.bundle_id == bundle.bundle_id:
            return InstallResult(  # nothing to do: the running model is this bundle, committed
                S.COMMITTED,
                self.current_slot(),
                bundle.bundle_id,
                bundle.manifest.version,
                changed=False,
                reason="already installed and current",
            )
        st = self.load_state()
        st["transition_count"] = 0
        target = self.inactive_slot()
        st = self._save(
            st,
            step(SlotState(st["state"]), E.START),
            target={"slot": target, "bundle_id": bundle.bundle_id, "version": bundle.manifest.version},
            previous=self.current_slot(),
            reason="",
        )
        try:  # VERIFYING
            bundle.verify(
                self.trusted_key,
                device=dev["profile"],
                arch=dev.get("arch"),
                installed_sequence=None if cur is None else cur.manifest.sequence,
            )
        except BundleError as exc:
            st = self._advance(st, E.FAILURE, reason=f"verify: {exc.message}")
            return self._result(st, bundle, changed=False)
        st = self._advance(st, E.SUCCESS)
        try:  # INSTALLING: write to a temp folder, then rename into the inactive slot
            tmp = self.slots / f".{target}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            bundle.extract(tmp)
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            shutil.rmtree(self.slots / target, ignore_errors=True)
            os.replace(tmp, self.slots / target)
            fsync_dir(self.slots)
            installed = Bundle.open(self.slots / target)
            installed.verify(self.trusted_key, device=dev["profile"], arch=dev.get("arch"))
        except (OSError, BundleError) as exc:
            shutil.rmtree(self.slots / target, ignore_errors=True)
            st = self._advance(st, E.FAILURE, reason=f"install: {exc}")
            return self._result(st, bundle, changed=False)
        st = self._advance(st, E.SUCCESS)
        health = self._health(target, backend=backend, runs=health_runs)  # HEALTH_CHECK
        if not health.get("ok"):
            shutil.rmtree(self.slots / target, ignore_errors=True)
            st = self._advance(st, E.FAILURE, reason=f"health check: {health.get('reason')}")
            return self._result(st, bundle, changed=False, health=health)
        st = self._advance(st, E.SUCCESS, health=health)
        atomic_symlink(f"slots/{target}", self.current_link)  # SWITCHING: the one atomic flip
        st = self._advance(st, E.SUCCESS)
        if commit:
            st = self._advance(st, E.SUCCESS)
        return self._result(st, bundle, changed=True, health=health)

    def load_state_enum(self) -> SlotState:
        return SlotState(self.load_state()["state"])

    def _health(self, slot: str, *, backend: str | None, runs: int) -> dict[str, Any]:
        from edgeglm.runtime.engine import Engine

        try:
            with Engine.open(self.slots / slot, public_key=self.trusted_key, backend=backend, arch=None) as eng:
                return eng.health_check(runs=runs).to_dict()
        except Exception as exc:  # any failure to load or run is an unhealthy install
            return {"ok": False, "reason": f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"}

    def _result(
        self, st: dict[str, Any], bundle: Bundle, *, changed: bool, health: dict | None = None
    ) -> InstallResult:
        return InstallResult(
            SlotState(st["state"]),
            self.current_slot(),
            bundle.bundle_id,
            bundle.manifest.version,
            changed=changed,
            reason=st.get("reason", ""),
            health=health or {},
        )

    @_exclusive
    def commit(self) -> SlotState:
        """Make the switched-to model permanent (PROBATION → COMMITTED)."""
        st = self.load_state()
        if SlotState(st["state"]) is S.COMMITTED:
            return S.COMMITTED
        if SlotState(st["state"]) is not S.PROBATION:
            raise OtaError(
                f"nothing to commit: the install is in state {st['state']}",
                hint="run 'edgeglm edge status' to see the last install",
            )
        return SlotState(self._advance(st, E.SUCCESS)["state"])

    @_exclusive
    def rollback(self, reason: str = "rolled back on request") -> SlotState:
        """Point ``current`` back at the previous slot (from SWITCHING / PROBATION / ROLLING_BACK)."""
        st = self.load_state()
        state = SlotState(st["state"])
        if state in (S.SWITCHING, S.PROBATION):
            st = self._advance(st, E.FAILURE, reason=reason)
        elif state is not S.ROLLING_BACK:
            raise OtaError(
                f"nothing to roll back: the install is in state {state.value}",
                hint="only an uncommitted install (probation) can be rolled back",
            )
        prev = st.get("previous")
        if prev and (self.slots / prev / "manifest.json").is_file():
            atomic_symlink(f"slots/{prev}", self.current_link)
        elif prev is None and self.current_link.is_symlink():  # first install ever: no previous model
            self.current_link.unlink()
            fsync_dir(self.root)
        return SlotState(self._advance(st, E.SUCCESS)["state"])

    @_exclusive
    def recover(self) -> SlotState:
        """Finish an install a crash interrupted (see module doc). Idempotent; call at every start."""
        if not self.state_path.is_file():
            return S.IDLE
        st = self.load_state()
        state = SlotState(st["state"])
        if state in TERMINAL:
            return state
        if state in (S.VERIFYING, S.INSTALLING, S.HEALTH_CHECK):
            target = (st.get("target") or {}).get("slot")
            if target and target != self.current_slot():
                shutil.rmtree(self.slots / target, ignore_errors=True)
            shutil.rmtree(self.slots / f".{target}.tmp", ignore_errors=True)
            return SlotState(self._advance(st, E.FAILURE, reason=f"interrupted during {state.value}")["state"])
        if state is not S.ROLLING_BACK:
            self._advance(st, E.FAILURE, reason=f"interrupted during {state.value} (not committed)")
        return self.rollback()
