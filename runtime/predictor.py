"""The streaming predictor: sensor rows in, RUL, health and alarms out (numpy + stdlib only).

Per stream (one machine or unit), every accepted row goes through::

    c      = nearest condition of the row's settings            (WindowSpec.normalization)
    z      = (sensors − μ_c) / σ_c  → float32                    normalized once, on arrival
    z_j    = z_j of the previous row   if sensor j is bad        hold last valid (0 before any)
    window = the last W rows of z                                 per-stream buffer, (W, n_sensors)
    rul    = infer(window[None])                                  injected inference callable
    health = clip(rul / rul_cap, 0, 1)
    alarm  = hysteresis + debounce on rul                         (:mod:`edgeglm.runtime.alarms`)

**Streaming equals training.** Normalization, the hold and the window are
computed exactly as :meth:`WindowSpec.normalize` and :meth:`WindowSpec.windows`
compute them: same float64 arithmetic, same float32 rounding, a bad sensor
takes the previous row's *normalized* value (``hold_last_valid``) and a stream
whose first rows are bad starts from 0 (the condition mean). Streaming a table
row by row therefore gives bit-for-bit the windows of ``WindowSpec.windows``
(stride 1), and :meth:`Predictor.replay` is that batch path.

**Warm-up.** With :attr:`Warmup.WAIT` (default) a stream predicts from its
``W``-th accepted row on: training only ever saw full windows. With
:attr:`Warmup.PAD` it predicts from its first row, front-padding by repeating
the first row exactly as ``WindowSpec.last_windows`` does for short units.

**Bad rows** never raise. A reading must be a number or a numeric string (as CSV
readers give them; ``bool`` is not numeric). Each reading is classified (:class:`BadKind`) and
counted per ``(kind, sensor)`` in :class:`Counters`, and the row is handled as
:class:`BadRowPolicy` says:

- ``HOLD`` (NaN, inf, missing, non-numeric readings): a bad sensor reading
  takes the last valid normalized value; a bad *setting* takes the last valid raw
  setting (so the condition does not jump; with none yet it is NaN, which picks
  condition 0 as in the batch path). After ``max_hold`` consecutive bad
  readings of one channel a :class:`SensorFault` is emitted (once per fault run;
  a valid reading ends the run) and then ``on_hold_expired`` decides: ``HOLD``
  keeps holding (default; the same as training's unbounded hold) or ``DROP``
  skips the stream's rows until the channel reads valid again.
- ``IGNORE`` (extra, unknown keys): the value is not used, only counted.
- ``DROP``: skip the row silently. ``REJECT``: skip it and emit :class:`RowRejected`.
  If a row has several problems, ``REJECT`` beats ``DROP`` beats ``HOLD``/``IGNORE``.
  A row skipped this way leaves the stream untouched (buffer, hold runs, last
  timestamp); a row skipped by ``on_hold_expired=DROP`` still advances the hold runs.
- Timestamps must increase per stream: a row with ``t`` equal to (duplicate) or
  below (out of order) the stream's last *accepted* ``t`` is dropped by default;
  its readings are not inspected.
- A row without a usable stream id or timestamp (``MALFORMED``) is always rejected.

Deviations from the batch path, all for inputs training data never has: an
``inf`` reading is held (the batch path keeps it), a bad setting is held (the
batch path picks condition 0), and ``on_hold_expired=DROP`` skips rows the batch
path would keep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

import numpy as np

from edgeglm.data.table import SensorTable
from edgeglm.errors import BackendError, ConfigError, DataError
from edgeglm.runtime.alarms import Alarm, AlarmCleared, AlarmConfig, AlarmRaised, _json_float
from edgeglm.windowing import WindowSpec

__all__ = [
    "Action",
    "BadKind",
    "BadRowPolicy",
    "Counters",
    "Event",
    "Infer",
    "Prediction",
    "Predictor",
    "Row",
    "RowRejected",
    "SensorFault",
    "Warmup",
]

SCHEMA_VERSION = 1
_RESERVED = ("stream", "t")  # keys of a row mapping that are not readings
_MAX_EXTRA_NAMES = 32  # distinct unknown keys counted by name; the rest under "<other>"
_OTHER = "<other>"
_MISSING = object()
_FLOAT_ONLY = {float}

Infer = Callable[[np.ndarray], np.ndarray]
"""Inference: windows ``(batch, window, n_sensors)`` float32 → RUL ``(batch,)`` or ``(batch, 1)``.

The array passed in is reused by the predictor after the call returns: copy it to keep it."""


class BadKind(str, Enum):
    """What is wrong with a reading or a row."""

    NAN = "nan"  # the reading is NaN
    INF = "inf"  # the reading is ±inf (or a number too large for a float)
    MISSING = "missing"  # a sensor or setting of the WindowSpec is absent
    NON_NUMERIC = "non_numeric"  # the reading is neither a number nor a numeric string
    EXTRA = "extra"  # a key the WindowSpec does not know
    OUT_OF_ORDER = "out_of_order"  # t below the stream's last accepted t
    DUPLICATE = "duplicate"  # t equal to the stream's last accepted t
    MALFORMED = "malformed"  # no usable stream id or timestamp, or no readings mapping


_VALUE_KINDS = (BadKind.NAN, BadKind.INF, BadKind.MISSING, BadKind.NON_NUMERIC)


class Action(str, Enum):
    """What to do with a bad reading or row (see the module docstring)."""

    HOLD = "hold"
    IGNORE = "ignore"
    DROP = "drop"
    REJECT = "reject"


_SEVERITY = {Action.HOLD: 0, Action.IGNORE: 0, Action.DROP: 1, Action.REJECT: 2}


class Warmup(str, Enum):
    """When a new stream starts predicting."""

    WAIT = "wait"  # from the W-th row: full windows only, like WindowSpec.windows
    PAD = "pad"  # from the first row, front-padded with the first row like WindowSpec.last_windows


@dataclass(frozen=True)
class BadRowPolicy:
    """How the predictor handles each :class:`BadKind` (actions may be given as strings).

    Args:
        nan, inf, missing, non_numeric: ``HOLD``, ``DROP`` or ``REJECT`` (default: ``HOLD``).
        extra: ``IGNORE``, ``DROP`` or ``REJECT`` (default: ``IGNORE``).
        out_of_order, duplicate: ``DROP`` or ``REJECT`` (default: ``DROP``).
        max_hold: consecutive bad readings of one channel held before a
            :class:`SensorFault` (default: 5; ≥ 0).
        on_hold_expired: ``HOLD`` (keep holding, default) or ``DROP`` (skip the stream's rows
            until the channel reads valid again).
        schema_version: layout version of this config (must be 1).

    Raises:
        ConfigError: an action is unknown or not allowed for its kind, ``max_hold < 0``,
            or the schema version is unknown.
    """

    nan: Action = Action.HOLD
    inf: Action = Action.HOLD
    missing: Action = Action.HOLD
    non_numeric: Action = Action.HOLD
    extra: Action = Action.IGNORE
    out_of_order: Action = Action.DROP
    duplicate: Action = Action.DROP
    max_hold: int = 5
    on_hold_expired: Action = Action.HOLD
    schema_version: int = SCHEMA_VERSION

    _ALLOWED: ClassVar[dict[str, tuple[Action, ...]]] = {
        **{k.value: (Action.HOLD, Action.DROP, Action.REJECT) for k in _VALUE_KINDS},
        "extra": (Action.IGNORE, Action.DROP, Action.REJECT),
        "out_of_order": (Action.DROP, Action.REJECT),
        "duplicate": (Action.DROP, Action.REJECT),
        "on_hold_expired": (Action.HOLD, Action.DROP),
    }

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"BadRowPolicy.schema_version = {self.schema_version!r}; this EdgeGLM reads {SCHEMA_VERSION}",
                hint="write the bad-row policy for schema_version 1",
            )
        for name, allowed in self._ALLOWED.items():
            value = getattr(self, name)
            try:
                action = Action(value)
            except ValueError:
                action = None
            if action not in allowed:
                valid = ", ".join(a.value for a in allowed)
                raise ConfigError(
                    f"BadRowPolicy.{name} = {value!r}; valid for {name}: {valid}",
                    hint=f'set {name} = "{allowed[0].value}"',
                )
            object.__setattr__(self, name, action)
        m = self.max_hold
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ConfigError(f"BadRowPolicy.max_hold = {m!r}; valid: an integer ≥ 0", hint="e.g. max_hold = 5")

    def action(self, kind: BadKind) -> Action:
        """The action for ``kind`` (``MALFORMED`` rows are always rejected)."""
        return Action.REJECT if kind is BadKind.MALFORMED else getattr(self, kind.value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BadRowPolicy:
        """Build from a TOML table; unknown keys are a :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"bad-row policy has unknown keys {unknown}; known: {sorted(known)}", hint="fix the key")
        return cls(**d)


@dataclass
class Counters:
    """Running totals for the metrics endpoint; read with :meth:`snapshot`.

    Invariant: ``rows == accepted + dropped + rejected``.

    Attributes:
        rows: rows pushed. accepted: rows that entered a stream's window.
        dropped: rows skipped silently. rejected: rows skipped with a :class:`RowRejected`.
        held: readings replaced by their last valid value.
        predictions, sensor_faults, alarms_raised, alarms_cleared: events emitted.
        bad: bad readings and rows per ``(kind, sensor)``; row-level kinds (timestamps,
            ``MALFORMED``) use sensor ``""``; unknown keys beyond 32 distinct names are
            counted under ``"<other>"``.
    """

    rows: int = 0
    accepted: int = 0
    dropped: int = 0
    rejected: int = 0
    held: int = 0
    predictions: int = 0
    sensor_faults: int = 0
    alarms_raised: int = 0
    alarms_cleared: int = 0
    bad: dict[tuple[BadKind, str], int] = field(default_factory=dict)
    _extra_names: int = field(default=0, repr=False)

    def count(self, kind: BadKind, sensor: str) -> str:
        """Count one bad reading or row; returns the sensor label it was counted under."""
        key = (kind, sensor)
        if key not in self.bad:
            if kind is BadKind.EXTRA:
                if self._extra_names >= _MAX_EXTRA_NAMES:
                    key = (kind, _OTHER)
                else:
                    self._extra_names += 1
            self.bad.setdefault(key, 0)
        self.bad[key] += 1
        return key[1]

    def total(self, kind: BadKind | None = None) -> int:
        """Bad readings and rows counted, of one kind or of all kinds."""
        return sum(n for (k, _), n in self.bad.items() if kind is None or k is kind)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy: the totals plus ``bad`` as ``[{kind, sensor, count}, …]``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["bad"] = [{"kind": k.value, "sensor": s, "count": n} for (k, s), n in sorted(self.bad.items())]
        return out


# -- rows and events ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One reading of one stream.

    Args:
        stream: stream id (machine or unit); an ``int`` is accepted and turned into ``str``.
        t: timestamp or cycle number (int or float, finite); must increase per stream.
        values: sensor and setting name → reading (numbers or numeric strings).
    """

    stream: str
    t: float
    values: Mapping[str, object]

    @classmethod
    def from_mapping(cls, d: Mapping[str, object]) -> Row:
        """``{"stream": …, "t": …, "<name>": value, …}`` (a parsed JSON line) → :class:`Row`.

        Never raises for a mapping: a missing or unusable ``stream``/``t`` is left for the
        predictor to reject as ``MALFORMED``. (:meth:`Predictor.push` also takes the mapping
        itself, which skips this copy.)
        """
        return cls(d.get("stream"), d.get("t"), {k: v for k, v in d.items() if k not in _RESERVED})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Prediction:
    """One RUL prediction.

    Args:
        stream, t: the row that completed the window.
        rul: predicted RUL (the model's unit, cycles).
        health: ``clip(rul / rul_cap, 0, 1)``: 1 healthy, 0 at end of life.
        latency_us: wall time of the inference call that produced it, µs (shared by a batch).
    """

    event: ClassVar[str] = "prediction"
    stream: str
    t: float
    rul: float
    health: float
    latency_us: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "stream": self.stream,
            "t": self.t,
            "rul": _json_float(self.rul),
            "health": _json_float(self.health),
            "latency_us": self.latency_us,
        }


@dataclass(frozen=True)
class SensorFault:
    """A channel (sensor or setting) of a stream read bad more than ``max_hold`` times in a row.

    Args:
        stream, t: the row where the run passed ``max_hold``.
        sensor: channel name.
        kind: what was wrong with that reading.
        bad_rows: length of the run so far (``max_hold + 1``).
    """

    event: ClassVar[str] = "sensor_fault"
    stream: str
    t: float
    sensor: str
    kind: BadKind
    bad_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "stream": self.stream,
            "t": self.t,
            "sensor": self.sensor,
            "kind": self.kind.value,
            "bad_rows": self.bad_rows,
        }


@dataclass(frozen=True)
class RowRejected:
    """A row was skipped under a ``REJECT`` action.

    Args:
        stream, t: as given, or ``None`` when unusable (``MALFORMED``).
        reasons: every problem found in the row, as ``(kind, sensor)``; ``""`` for row-level kinds.
    """

    event: ClassVar[str] = "row_rejected"
    stream: str | None
    t: float | None
    reasons: tuple[tuple[BadKind, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "stream": self.stream,
            "t": self.t,
            "reasons": [{"kind": k.value, "sensor": s} for k, s in self.reasons],
        }


Event = Prediction | AlarmRaised | AlarmCleared | SensorFault | RowRejected


# -- parsing helpers ----------------------------------------------------------------------


def _as_float(v: object) -> float | None:
    """A reading as a float (may be NaN or inf), or ``None`` if it is not numeric."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (float, int, np.floating, np.integer)):
        try:
            return float(v)
        except OverflowError:  # an int beyond the float range
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _classify(vals: list) -> tuple[list[tuple[int, BadKind]] | None, int]:
    """Turn readings into floats in place (NaN where bad); return ``(bad, present)``:
    ``(channel index, kind)`` of every bad reading (``None`` if none) and the keys present."""
    bad = []
    present = 0
    for j, v in enumerate(vals):
        if v is _MISSING:
            vals[j] = math.nan
            bad.append((j, BadKind.MISSING))
            continue
        present += 1
        f = v if type(v) is float else _as_float(v)
        if f is None:
            kind = BadKind.NON_NUMERIC
        elif f - f == 0.0:
            vals[j] = f
            continue
        else:
            kind = BadKind.NAN if f != f else BadKind.INF
        vals[j] = math.nan
        bad.append((j, kind))
    return bad or None, present


def _stream_id(s: object) -> str | None:
    if isinstance(s, str):
        return str(s)
    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
        return str(int(s))
    return None


def _timestamp(t: object) -> float | None:
    if isinstance(t, bool) or not isinstance(t, (float, int, np.floating, np.integer)):
        return None
    t = int(t) if isinstance(t, (int, np.integer)) else float(t)
    return t if t - t == 0 else None


# -- the predictor ------------------------------------------------------------------------


class _Stream:
    """Per-stream state: a linear buffer of normalized rows, compacted when full."""

    __slots__ = ("alarm", "buf", "count", "end", "last_t", "running", "runs", "settings", "sid")

    def __init__(self, sid: str, capacity: int, window: int, n_sensors: int, n_settings: int, alarm: Alarm) -> None:
        self.sid = sid
        self.buf = np.zeros((capacity, n_sensors), np.float32)
        self.end = window - 1  # one past the newest row; rows [end − W, end) are the window
        self.count = 0  # accepted rows
        self.last_t: float | None = None
        self.settings = [math.nan] * n_settings  # last valid raw settings
        self.runs: list[int] = []  # consecutive bad readings per channel (allocated on first bad)
        self.running: set[int] = set()  # channels with runs > 0
        self.alarm = alarm


class Predictor:
    """Streaming RUL predictor over many streams (see the module docstring).

    Args:
        spec: the bundle's :class:`WindowSpec` (sensor order, window, normalization, RUL cap).
        infer: the model, see :data:`Infer`; called with at most ``max_batch`` windows.
        alarm: alarm thresholds (keyword only).
        policy: bad-row handling (default: ``BadRowPolicy()``).
        max_batch: most windows per ``infer`` call in :meth:`push_many` and :meth:`replay` (default: 64).
        warmup: when a new stream starts predicting (default: ``Warmup.WAIT``).

    Attributes:
        counters: :class:`Counters` for the metrics endpoint.

    Raises:
        ConfigError: an argument has the wrong type or ``max_batch < 1``.

    Shapes:
        ``infer`` input ``(batch, spec.window, spec.num_sensors)`` float32; output ``(batch,)``
        or ``(batch, 1)``.
    """

    def __init__(
        self,
        spec: WindowSpec,
        infer: Infer,
        *,
        alarm: AlarmConfig,
        policy: BadRowPolicy | None = None,
        max_batch: int = 64,
        warmup: Warmup = Warmup.WAIT,
    ) -> None:
        policy = BadRowPolicy() if policy is None else policy
        if not isinstance(spec, WindowSpec):
            raise ConfigError(f"spec is a {type(spec).__name__}, not a WindowSpec", hint="pass the bundle's WindowSpec")
        if not callable(infer):
            raise ConfigError(f"infer = {infer!r} is not callable", hint="pass a function windows → RUL")
        if not isinstance(alarm, AlarmConfig):
            raise ConfigError(f"alarm is a {type(alarm).__name__}, not an AlarmConfig", hint="pass AlarmConfig(...)")
        if not isinstance(policy, BadRowPolicy):
            raise ConfigError(f"policy is a {type(policy).__name__}, not a BadRowPolicy", hint="pass BadRowPolicy()")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch = {max_batch!r}; valid: an integer ≥ 1", hint="e.g. max_batch = 64")
        try:
            warmup = Warmup(warmup)
        except ValueError:
            raise ConfigError(f"warmup = {warmup!r}; valid: 'wait', 'pad'", hint="use Warmup.WAIT") from None
        self.spec = spec
        self.alarm_config = alarm
        self.policy = policy
        self.max_batch = max_batch
        self.warmup = warmup
        self.counters = Counters()
        self._infer = infer
        self._streams: dict[str, _Stream] = {}

        w, s = spec.window, spec.num_sensors
        self._window = w
        self._capacity = 4 * w
        self._n_sensors = s
        self._channels = spec.sensor_names + spec.setting_names
        self._channel_set = frozenset(self._channels)
        self._pad = warmup is Warmup.PAD
        self._rul_cap = float(spec.rul_cap)
        self._action = {k: policy.action(k) for k in BadKind}
        self._expired_drop = policy.on_hold_expired is Action.DROP
        norm = spec.normalization
        self._mean = [norm.mean[c] for c in range(norm.num_conditions)]
        self._std = [norm.std[c] for c in range(norm.num_conditions)]
        self._centers = norm.centers.tolist()
        self._scale = norm.scale.tolist()
        self._x = np.empty(s, np.float64)  # scratch row
        self._zero = np.zeros(s, np.float32)
        self._batch = np.empty((max_batch, w, s), np.float32)

    # -- public API -----------------------------------------------------------------------

    @property
    def streams(self) -> tuple[str, ...]:
        """Ids of the streams seen so far, in order of first accepted row."""
        return tuple(self._streams)

    def active_alarms(self) -> tuple[str, ...]:
        """Ids of the streams whose alarm is raised."""
        return tuple(sid for sid, st in self._streams.items() if st.alarm.active)

    def push(self, row: Row | Mapping[str, object]) -> list[Event]:
        """Feed one row; return its events in order (bad-row events, then prediction and alarm).

        ``row`` may be a :class:`Row` or a mapping as in :meth:`Row.from_mapping`. Never raises
        for a bad row; an exception from ``infer`` propagates (the row stays accepted).

        Raises:
            BackendError: ``infer`` returned the wrong number of values.
        """
        events: list[Event] = []
        st = self._ingest(row, events)
        if st is not None:
            end = st.end
            window = st.buf[end - self._window : end][None]
            t0 = time.perf_counter_ns()
            out = self._infer(window)
            latency = (time.perf_counter_ns() - t0) // 1000
            self._emit(st, st.last_t, self._ruls(out, 1)[0], latency, events)  # type: ignore[arg-type]
        return events

    def push_many(self, rows: Iterable[Row | Mapping[str, object]]) -> list[Event]:
        """Feed rows in order with batched inference (``max_batch`` windows per call).

        Returns the same events in the same order as calling :meth:`push` on each row
        (predictions equal for a batch-invariant ``infer``; ``latency_us`` is per batch).

        Raises:
            BackendError: ``infer`` returned the wrong number of values.
        """
        slots: list[Event | list[Event]] = []
        pending: list[tuple[_Stream, float, list[Event]]] = []
        batch, w, max_batch = self._batch, self._window, self.max_batch
        for row in rows:
            st = self._ingest(row, slots)  # type: ignore[arg-type]
            if st is None:
                continue
            batch[len(pending)] = st.buf[st.end - w : st.end]
            slot: list[Event] = []
            slots.append(slot)
            pending.append((st, st.last_t, slot))  # type: ignore[arg-type]
            if len(pending) == max_batch:
                self._flush(pending)
                pending = []
        if pending:
            self._flush(pending)
        events: list[Event] = []
        for e in slots:
            if type(e) is list:
                events.extend(e)
            else:
                events.append(e)  # type: ignore[arg-type]
        return events

    def replay(self, table: SensorTable) -> list[Prediction]:
        """Batch path: predictions for every row of ``table`` at which streaming would predict.

        Uses ``WindowSpec.normalize`` and sliding windows (stride 1, ``WindowSpec.windows``; with
        ``Warmup.PAD`` also the padded ``last_windows`` of every prefix). Stream ids are
        ``str(unit)``, ``t`` the cycle. Touches no stream state, counters or alarms.

        Raises:
            DataError: the table lacks a sensor or setting of the spec.
            BackendError: ``infer`` returned the wrong number of values.
        """
        spec = self.spec
        missing = [n for n in spec.sensor_names if n not in table.sensor_names]
        missing += [n for n in spec.setting_names if n not in table.setting_names]
        if missing:
            raise DataError(
                f"replay table lacks {missing} required by the window spec",
                hint="replay a table from the same data source as the model",
            )
        z = spec.normalize(table)
        w, batch, max_batch = self._window, self._batch, self.max_batch
        out: list[Prediction] = []
        keys: list[tuple[str, int]] = []
        for uid, sl in table.unit_slices():
            zu = z[sl]
            if self._pad:
                zu = np.concatenate([np.repeat(zu[:1], w - 1, axis=0), zu])
            elif zu.shape[0] < w:
                continue
            view = np.lib.stride_tricks.sliding_window_view(zu, w, axis=0).transpose(0, 2, 1)  # (m, W, S)
            cycles = table.cycle[sl][sl.stop - sl.start - view.shape[0] :].tolist()
            sid = str(uid)
            done = 0
            while done < view.shape[0]:
                take = min(max_batch - len(keys), view.shape[0] - done)
                batch[len(keys) : len(keys) + take] = view[done : done + take]
                keys.extend((sid, c) for c in cycles[done : done + take])
                done += take
                if len(keys) == max_batch:
                    self._replay_flush(keys, out)
                    keys = []
        if keys:
            self._replay_flush(keys, out)
        return out

    # -- internals ------------------------------------------------------------------------

    def _ruls(self, out: object, n: int) -> list[float]:
        a = np.asarray(out)
        if a.size != n:
            raise BackendError(
                f"inference returned shape {a.shape} for {n} windows; expected ({n},) or ({n}, 1)",
                hint="the model must output one RUL per window",
            )
        return a.reshape(n).tolist()

    def _health(self, rul: float) -> float:
        h = rul / self._rul_cap
        return 0.0 if h < 0.0 else 1.0 if h > 1.0 else h  # NaN stays NaN

    def _emit(self, st: _Stream, t: float, rul: float, latency: int, events: list[Event]) -> None:
        events.append(Prediction(st.sid, t, rul, self._health(rul), latency))
        c = self.counters
        c.predictions += 1
        ev = st.alarm.update(t, rul)
        if ev is not None:
            events.append(ev)
            if isinstance(ev, AlarmRaised):
                c.alarms_raised += 1
            else:
                c.alarms_cleared += 1

    def _flush(self, pending: list[tuple[_Stream, float, list[Event]]]) -> None:
        n = len(pending)
        t0 = time.perf_counter_ns()
        out = self._infer(self._batch[:n])
        latency = (time.perf_counter_ns() - t0) // 1000
        for (st, t, slot), rul in zip(pending, self._ruls(out, n), strict=True):
            self._emit(st, t, rul, latency, slot)

    def _replay_flush(self, keys: list[tuple[str, int]], out: list[Prediction]) -> None:
        n = len(keys)
        t0 = time.perf_counter_ns()
        res = self._infer(self._batch[:n])
        latency = (time.perf_counter_ns() - t0) // 1000
        for (sid, t), rul in zip(keys, self._ruls(res, n), strict=True):
            out.append(Prediction(sid, t, rul, self._health(rul), latency))

    def _skip(self, events: list, sid: str | None, t: float | None, reasons: list, action: Action) -> None:
        if action is Action.REJECT:
            self.counters.rejected += 1
            events.append(RowRejected(sid, t, tuple(reasons)))
        else:
            self.counters.dropped += 1

    def _condition(self, settings: list[float]) -> int:
        """``Normalization.condition`` of one row, in Python floats (numpy costs ~10 µs a row).

        Distances are the same elementwise float64 operations; only the summation order may
        differ by an ulp, so near-ties and non-finite distances fall back to numpy for an
        identical argmin."""
        centers = self._centers
        if len(centers) == 1:
            return 0
        scale = self._scale
        best, lo, second = -1, math.inf, math.inf
        if len(scale) == 2:  # the common case (load, speed), unrolled: 3× faster than the loop below
            s0, s1 = settings
            k0, k1 = scale
            for k, (c0, c1) in enumerate(centers):
                q0 = (s0 - c0) / k0
                q1 = (s1 - c1) / k1
                acc = q0 * q0 + q1 * q1
                if acc < lo:
                    best, lo, second = k, acc, lo
                elif acc < second:
                    second = acc
        else:
            for k, center in enumerate(centers):
                acc = 0.0
                for s, c, sc in zip(settings, center, scale, strict=True):
                    q = (s - c) / sc
                    acc += q * q
                if acc < lo:
                    best, lo, second = k, acc, lo
                elif acc < second:
                    second = acc
        if best < 0 or lo == math.inf or second - lo <= 1e-9 * lo:  # NaN settings, overflow, near-tie
            return int(self.spec.normalization.condition(np.asarray([settings], np.float64))[0])
        return best

    def _ingest(self, row: object, events: list[Event]) -> _Stream | None:
        """Check, count and buffer one row; return its stream if a prediction is due."""
        c = self.counters
        c.rows += 1
        if type(row) is Row:
            sid, t, values, reserved = row.stream, row.t, row.values, 0
        elif type(row) is dict or isinstance(row, Mapping):
            sid, t, values = row.get("stream"), row.get("t"), row
            reserved = ("stream" in row) + ("t" in row)
        else:
            sid = t = values = None
            reserved = 0
        if type(sid) is not str:
            sid = _stream_id(sid)
        if type(t) is float:
            if t - t != 0:
                t = None
        elif type(t) is not int:
            t = _timestamp(t)
        if sid is None or t is None or not (type(values) is dict or isinstance(values, Mapping)):
            c.count(BadKind.MALFORMED, "")
            self._skip(events, sid, t, [(BadKind.MALFORMED, "")], Action.REJECT)
            return None

        st = self._streams.get(sid)
        if st is not None and st.last_t is not None and t <= st.last_t:
            kind = BadKind.DUPLICATE if t == st.last_t else BadKind.OUT_OF_ORDER
            c.count(kind, "")
            self._skip(events, sid, t, [(kind, "")], self._action[kind])
            return None

        # classify every channel (sensors, then settings); fast path: all finite floats
        get = values.get  # type: ignore[union-attr]
        vals = [get(name, _MISSING) for name in self._channels]
        bad: list[tuple[int, BadKind]] | None = None
        present = len(vals)
        if set(map(type, vals)) != _FLOAT_ONLY or (total := sum(vals)) - total != 0.0:
            bad, present = _classify(vals)

        severity = 0
        reasons: list[tuple[BadKind, str]] | None = None
        if bad is not None:
            reasons = []
            for j, kind in bad:
                reasons.append((kind, c.count(kind, self._channels[j])))
                severity = max(severity, _SEVERITY[self._action[kind]])
        if len(values) - reserved > present:  # type: ignore[arg-type]
            extras = [k for k in values if k not in self._channel_set and not (reserved and k in _RESERVED)]  # type: ignore[union-attr]
            if extras:
                reasons = reasons if reasons is not None else []
                for k in extras:
                    reasons.append((BadKind.EXTRA, c.count(BadKind.EXTRA, str(k))))
                severity = max(severity, _SEVERITY[self._action[BadKind.EXTRA]])
        if severity:
            self._skip(events, sid, t, reasons, Action.REJECT if severity == 2 else Action.DROP)  # type: ignore[arg-type]
            return None

        w, n_sensors = self._window, self._n_sensors
        if st is None:
            n_settings = len(self._channels) - n_sensors
            st = _Stream(sid, self._capacity, w, n_sensors, n_settings, Alarm(self.alarm_config, sid))
            self._streams[sid] = st

        # hold runs: count consecutive bad readings per channel, fault past max_hold
        settings = vals[n_sensors:]
        if bad is not None or st.running:
            if not st.runs:
                st.runs = [0] * len(self._channels)
            runs, max_hold = st.runs, self.policy.max_hold
            now = set()
            expired = False
            if bad is not None:
                for j, kind in bad:
                    now.add(j)
                    r = runs[j] = runs[j] + 1
                    if r > max_hold:
                        expired = True
                        if r == max_hold + 1:
                            c.sensor_faults += 1
                            events.append(SensorFault(sid, t, self._channels[j], kind, r))
            for j in st.running - now:
                runs[j] = 0
            st.running = now
            if expired and self._expired_drop:
                c.dropped += 1
                return None
            if bad is not None:
                c.held += len(bad)
                held = st.settings
                for j, _ in bad:
                    if j >= n_sensors:
                        settings[j - n_sensors] = held[j - n_sensors]
        st.settings = settings

        # normalize once, into the buffer
        cond = self._condition(settings)
        x = self._x
        x[:] = vals[:n_sensors]
        np.subtract(x, self._mean[cond], out=x)
        np.divide(x, self._std[cond], out=x)
        end = st.end
        if end == self._capacity:  # compact: keep the newest W − 1 rows
            st.buf[: w - 1] = st.buf[end - w + 1 : end]
            end = w - 1
        buf = st.buf
        buf[end] = x
        if bad is not None:
            z = buf[end]
            prev = buf[end - 1] if st.count else self._zero
            for j, _ in bad:
                if j < n_sensors:
                    z[j] = prev[j]
        if st.count == 0 and self._pad:
            buf[: w - 1] = buf[end]
        st.end = end + 1
        st.count += 1
        st.last_t = t
        c.accepted += 1
        return st if self._pad or st.count >= w else None
