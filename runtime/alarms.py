"""RUL alarms with hysteresis and debounce (stdlib only).

One :class:`Alarm` per stream turns the sequence of predicted RUL values into
raise / clear events. Two thresholds give hysteresis, a run length gives
debounce::

    idle   → raised   after ``debounce`` consecutive predictions with RUL ≤ rul_low
    raised → idle     after ``debounce`` consecutive predictions with RUL ≥ rul_clear

with ``rul_clear > rul_low``: a prediction between the two thresholds (or NaN)
breaks the current run and changes nothing else, so a RUL hovering around one
threshold never makes the alarm flap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from edgeglm.errors import ConfigError

__all__ = ["Alarm", "AlarmCleared", "AlarmConfig", "AlarmRaised"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AlarmConfig:
    """Thresholds of the RUL alarm.

    Example: raise at RUL ≤ 30 cycles, clear at RUL ≥ 40, each after 3 predictions in a row::

        AlarmConfig(rul_low=30, rul_clear=40, debounce=3)

    Args:
        rul_low: raise threshold, in the model's RUL unit (cycles).
        rul_clear: clear threshold, same unit; must be > ``rul_low`` (the hysteresis band).
        debounce: consecutive predictions past a threshold needed to raise or clear (≥ 1).
        schema_version: layout version of this config (must be 1).

    Raises:
        ConfigError: a threshold is not a finite number, ``rul_clear ≤ rul_low``,
            ``debounce < 1`` or the schema version is unknown.
    """

    rul_low: float
    rul_clear: float
    debounce: int
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"AlarmConfig.schema_version = {self.schema_version!r}; this EdgeGLM reads {SCHEMA_VERSION}",
                hint="write the alarm config for schema_version 1",
            )
        for name in ("rul_low", "rul_clear"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"AlarmConfig.{name} = {v!r}; valid: a finite number", hint=f"set {name} in cycles")
            object.__setattr__(self, name, float(v))
        if self.rul_clear <= self.rul_low:
            raise ConfigError(
                f"AlarmConfig.rul_clear = {self.rul_clear} is not above rul_low = {self.rul_low}",
                hint="set rul_clear > rul_low; the gap is the hysteresis band that stops the alarm flapping",
            )
        d = self.debounce
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ConfigError(
                f"AlarmConfig.debounce = {d!r}; valid: an integer ≥ 1",
                hint="use debounce = 1 to act on every prediction",
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlarmConfig:
        """Build from a TOML table; unknown keys are a :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"alarm config has unknown keys {unknown}; known: {sorted(known)}", hint="fix the key")
        return cls(**d)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class AlarmRaised:
    """The stream's RUL stayed ≤ ``rul_low`` for ``debounce`` predictions; ``t`` and ``rul`` are of the last one."""

    event: ClassVar[str] = "alarm_raised"
    stream: str
    t: float
    rul: float

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "stream": self.stream, "t": self.t, "rul": _json_float(self.rul)}


@dataclass(frozen=True)
class AlarmCleared:
    """The stream's RUL stayed ≥ ``rul_clear`` for ``debounce`` predictions; ``t`` and ``rul`` are of the last one."""

    event: ClassVar[str] = "alarm_cleared"
    stream: str
    t: float
    rul: float

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "stream": self.stream, "t": self.t, "rul": _json_float(self.rul)}


class Alarm:
    """The alarm state of one stream (see the module docstring for the rule).

    Args:
        config: thresholds and debounce.
        stream: the stream id written into the events.
    """

    __slots__ = ("_run", "active", "config", "stream")

    def __init__(self, config: AlarmConfig, stream: str) -> None:
        self.config = config
        self.stream = stream
        self.active = False
        self._run = 0  # consecutive predictions past the threshold that would flip the state

    def update(self, t: float, rul: float) -> AlarmRaised | AlarmCleared | None:
        """Feed one prediction; return the event if the state flips, else ``None``."""
        cfg = self.config
        past = rul >= cfg.rul_clear if self.active else rul <= cfg.rul_low
        if not past:
            self._run = 0
            return None
        self._run += 1
        if self._run < cfg.debounce:
            return None
        self._run = 0
        self.active = not self.active
        return AlarmRaised(self.stream, t, rul) if self.active else AlarmCleared(self.stream, t, rul)
