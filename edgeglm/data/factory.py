"""The factory-line simulator: EdgeGLM's embedded default data (numpy only).

A production line is a chain of machines (default: ``inlet_pump → compressor →
main_motor → conveyor → outlet_pump``), each with 3–4 sensors named
``"<machine>.<quantity>"`` (vibration mm/s, temperature °C, current A, pressure
bar, flow m³/h). A *unit* is one run-to-failure trajectory of the whole line,
cycle ``t = 1 … T``, like one C-MAPSS engine: one machine ``f`` (drawn per unit)
develops a fault and the unit ends when that machine's health index reaches 1.

Model of one unit (machine ``m`` at position ``i_m`` on the line; sensor ``s`` of
machine ``m(s)`` measuring quantity ``τ(s)``)::

    x_s(t) = μ_s(load(t), speed(t))                            regime level, physical units
           + c_s · [ D · a_τ · q(t − δ·i_m(s))                 shared process disturbance
                   + F · Σ_m E_ms · h_m(t)                      degradation, own and coupled
                   + σ · ε_s(t) ]                               noise, ε ~ N(0, 1) i.i.d.

- **Operating regimes.** ``(load %, speed rpm)`` takes one of ``K`` setpoints
  (``LineConfig.regimes``); it switches to another regime after a dwell drawn
  uniformly from ``regime_dwell_cycles``. The setpoints (with a tiny jitter) are the
  table's settings columns ``load_pct`` and ``speed_rpm``. Levels follow the
  affinity laws around the reference point (80 %, 1500 rpm) where the nominal
  level is ``N_s``: vibration and flow ``∝ speed``, pressure ``∝ speed²``, current
  ``N·(0.3 + 0.7·load/80·speed/1500)``, temperature ``25 °C + (N − 25 °C)·load/80``.
  Regime shifts are many ``c_s`` large, so normalize per regime
  (``fit_window_spec(conditions="auto")`` finds the ``K`` regimes).
- **Scale.** ``c_s`` is a fixed fraction of the nominal level (vibration 6 %,
  temperature 3 %, current/pressure/flow 4 %); everything in brackets is in units of
  ``c_s``.
- **Disturbance.** ``q`` is a slow AR(1) random walk of the line's throughput,
  ``q(t) = ρ q(t−1) + sqrt(1 − ρ²) η(t)``, ``ρ = 1 − 1/disturbance_cycles``, unit
  variance. It reaches machine ``m`` after a transport delay of ``δ·i_m`` cycles and
  loads every sensor positively (``a_τ`` = 1 for current, pressure, flow; 0.7 for
  vibration and temperature). Strength ``D`` (default 2.5).
- **Health.** ``h_m(t) = w_m`` (initial wear, ``w_m ~ U(0, initial_wear)``) for the
  healthy machines. For the faulty machine, with failure cycle ``T ~
  U(life_cycles)``, degradation length ``L ~ U(degradation_cycles)``, onset ``t0 = T −
  L`` and rate ``r = k / L`` (``k ~ U(1.5, 4)``)::

      h_f(t) = w_f + (1 − w_f) · (exp(r (t − t0)) − 1) / (exp(r L) − 1)    for t ≥ t0

  so ``h_f(T) = 1`` exactly: the last row of a training unit is the failure (RUL 0).
- **Degradation signature** ``E`` (machines × sensors, strength ``F``, default 2):
  the faulty machine's own sensors move by ``φ_τ`` (vibration +1, temperature +0.8,
  current +0.6, pressure −0.8, flow −0.8: rubbing and heat up, delivery down), and
  the coupled sensors of its neighbours move by ``κ`` (``coupling``, default 0.6):
  the downstream machine's drive current rises (it compensates for the weaker
  feed) and the upstream machine's outlet sensor rises (back-pressure / drag).
- **Dropouts.** A reading is lost (NaN) in bursts of 1 row (75 %) or 2–6 rows, so
  that about ``dropout_rate`` of the sensor readings are NaN; settings never drop.

**Why a graph helps here (the design goal).** Take a sensor ``s`` of the faulty
machine and a graph neighbour ``n`` (same machine, or the coupled sensor next
door). After per-regime normalization both carry nearly the same disturbance,
``z_s ≈ α q + β_s h_f + σ' ε_s`` and ``z_n ≈ α q + β_n h_f + σ' ε_n`` with
``α ≈ D a / sqrt(D² a² + σ²) ≈ 0.99`` for both. A single sensor sees ``β_s h_f`` —
at failure ``F·|φ_τ|/(D·a_τ) ≈ 0.5–1.1`` times its disturbance std, far less during
most of the degradation — buried in a slow walk that looks just like degradation
over a 30-cycle window; the difference

    z_s − z_n ≈ (β_s − β_n) h_f + σ' (ε_s − ε_n)

cancels ``q`` and isolates the degradation. The signature mixes signs (vibration
up, delivery down) so it survives differencing inside a machine, and the coupling
makes a fault visible from the neighbouring machines too.

Reproducibility: the same ``(config, seed)`` gives identical arrays; every unit
draws from its own ``numpy.random.SeedSequence`` child, so adding units never
changes the existing ones. ``Dataset.source`` is ``"factory"`` for the default
config and seed 0, else ``"factory?seed=<seed>"`` followed by ``&<field>=<value>``
for every config field that differs from the default (see
:func:`parse_factory_source`, which turns that string back into the config and seed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NoReturn

import numpy as np

from edgeglm.data.table import Dataset, SensorTable
from edgeglm.errors import ConfigError
from edgeglm.graph import SensorGraph

__all__ = [
    "LineConfig",
    "Machine",
    "MachineKind",
    "Quantity",
    "line_graph",
    "parse_factory_source",
    "simulate_line",
]

SCHEMA_VERSION = 1
SETTING_NAMES = ("load_pct", "speed_rpm")
REFERENCE_LOAD_PCT = 80.0
REFERENCE_SPEED_RPM = 1500.0
AMBIENT_C = 25.0
_SETTING_JITTER = (0.05, 0.5)  # std of the setpoint jitter: load %, speed rpm
_CURVATURE = (1.5, 4.0)  # k = r·L, how exponential the fault growth is
_BURST_SINGLE = 0.75  # share of dropout bursts that last one row
_BURST_LONG = (2, 6)  # length range of the other bursts, rows
_MIN_TEST_ROWS = 31  # a truncated test unit keeps at least this many cycles (one 30-cycle window + 1)
_SOURCE_PREFIX = "factory"


class MachineKind(str, Enum):
    """What a machine is; decides its sensors and its outlet sensor."""

    PUMP = "pump"
    COMPRESSOR = "compressor"
    MOTOR = "motor"
    CONVEYOR = "conveyor"


class Quantity(str, Enum):
    """What a sensor measures (the part of the sensor name after the dot)."""

    VIBRATION = "vibration"
    TEMPERATURE = "temperature"
    CURRENT = "current"
    PRESSURE = "pressure"
    FLOW = "flow"


@dataclass(frozen=True)
class _QuantitySpec:
    unit: str
    scale: float  # c_s as a fraction of the nominal level
    load: float  # a_τ, response to the throughput disturbance
    fault: float  # φ_τ, response to the machine's own health index


_QUANTITIES: dict[Quantity, _QuantitySpec] = {
    Quantity.VIBRATION: _QuantitySpec("mm/s", 0.06, 0.7, 1.0),
    Quantity.TEMPERATURE: _QuantitySpec("°C", 0.03, 0.7, 0.8),
    Quantity.CURRENT: _QuantitySpec("A", 0.04, 1.0, 0.6),
    Quantity.PRESSURE: _QuantitySpec("bar", 0.04, 1.0, -0.8),
    Quantity.FLOW: _QuantitySpec("m³/h", 0.04, 1.0, -0.8),
}


@dataclass(frozen=True)
class _KindSpec:
    nominal: dict[Quantity, float]  # sensor → level at the reference point, in the quantity's unit
    outlet: Quantity  # the sensor that feels back-pressure / drag from the downstream machine


_KINDS: dict[MachineKind, _KindSpec] = {
    MachineKind.PUMP: _KindSpec(
        {Quantity.VIBRATION: 2.8, Quantity.CURRENT: 38.0, Quantity.PRESSURE: 5.5, Quantity.FLOW: 42.0},
        Quantity.PRESSURE,
    ),
    MachineKind.COMPRESSOR: _KindSpec(
        {Quantity.VIBRATION: 3.6, Quantity.TEMPERATURE: 78.0, Quantity.CURRENT: 95.0, Quantity.PRESSURE: 7.8},
        Quantity.PRESSURE,
    ),
    MachineKind.MOTOR: _KindSpec(
        {Quantity.VIBRATION: 1.9, Quantity.TEMPERATURE: 64.0, Quantity.CURRENT: 120.0},
        Quantity.CURRENT,
    ),
    MachineKind.CONVEYOR: _KindSpec(
        {Quantity.VIBRATION: 4.2, Quantity.TEMPERATURE: 41.0, Quantity.CURRENT: 22.0, Quantity.FLOW: 35.0},
        Quantity.CURRENT,
    ),
}
_INLET = Quantity.CURRENT  # every machine's drive current feels the feed from upstream
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Machine:
    """One machine of the line.

    Args:
        name: lower-case identifier (``[a-z][a-z0-9_]*``), the prefix of its sensor names.
        kind: a :class:`MachineKind` or its value (``"pump"``).
    """

    name: str
    kind: MachineKind

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"machine name {self.name!r} is invalid; valid: a lower-case identifier matching [a-z][a-z0-9_]*",
                hint="rename the machine, e.g. 'inlet_pump'",
            )
        try:
            object.__setattr__(self, "kind", MachineKind(self.kind))
        except ValueError:
            kinds = [k.value for k in MachineKind]
            raise ConfigError(
                f"machine {self.name!r} has kind {self.kind!r}; valid kinds: {kinds}",
                hint="pick one of the known kinds",
            ) from None

    @property
    def sensors(self) -> tuple[str, ...]:
        """Sensor names of this machine, ``"<name>.<quantity>"``."""
        return tuple(f"{self.name}.{q.value}" for q in _KINDS[self.kind].nominal)


DEFAULT_MACHINES: tuple[Machine, ...] = (
    Machine("inlet_pump", MachineKind.PUMP),
    Machine("compressor", MachineKind.COMPRESSOR),
    Machine("main_motor", MachineKind.MOTOR),
    Machine("conveyor", MachineKind.CONVEYOR),
    Machine("outlet_pump", MachineKind.PUMP),
)


@dataclass(frozen=True)
class LineConfig:
    """Everything about the simulated line except the seed (see the module docstring for the model).

    Args:
        machines: the line, upstream first; :class:`Machine` or ``(name, kind)`` pairs
            (default: inlet_pump, compressor, main_motor, conveyor, outlet_pump; 2–26 machines).
        units_train: run-to-failure units in the train split (default: 80; 1–100000).
        units_test: truncated units in the test split (default: 40; 1–100000).
        life_cycles: ``(min, max)`` failure cycle ``T`` of a unit (default: (120, 350); 40–10000).
        degradation_cycles: ``(min, max)`` cycles from fault onset to failure ``L``
            (default: (80, 115); 10 ≤ min ≤ max < life_cycles min).
        regimes: ``(load %, speed rpm)`` operating setpoints (default: (60, 1200), (80, 1500),
            (100, 1800); 1–10 distinct regimes, load in (0, 150], speed in (0, 6000]).
        regime_dwell_cycles: ``(min, max)`` cycles a regime lasts before switching (default: (10, 60)).
        fault_strength: ``F``, the degradation effect at failure in units of ``c_s`` (default: 2.0; (0, 20]).
        coupling: ``κ``, share of a fault felt by the neighbours' coupled sensors (default: 0.6; [0, 1]).
        disturbance: ``D``, std of the shared throughput disturbance in units of ``c_s``
            (default: 2.5; [0, 20]).
        disturbance_cycles: correlation time of the disturbance, cycles (default: 40; [1, 10000]).
        transport_delay_cycles: ``δ``, cycles the disturbance takes from one machine to the next
            (default: 2; [0, 100]).
        noise: ``σ``, measurement noise std in units of ``c_s`` (default: 0.3; [0, 20]).
        initial_wear: largest initial health index ``w`` of a machine (default: 0.1; [0, 0.5]).
        dropout_rate: share of sensor readings that are NaN (default: 0.002; [0, 0.2]).
        test_rul_cycles: ``(min, max)`` true RUL at the last row of a test unit; capped so that
            each test unit keeps at least 31 cycles (default: (5, 150); 1 ≤ min ≤ max).
        schema_version: version of this config's layout (must be 1).
    """

    machines: tuple[Machine, ...] = DEFAULT_MACHINES
    units_train: int = 80
    units_test: int = 40
    life_cycles: tuple[int, int] = (120, 350)
    degradation_cycles: tuple[int, int] = (80, 115)
    regimes: tuple[tuple[float, float], ...] = ((60.0, 1200.0), (80.0, 1500.0), (100.0, 1800.0))
    regime_dwell_cycles: tuple[int, int] = (10, 60)
    fault_strength: float = 2.0
    coupling: float = 0.6
    disturbance: float = 2.5
    disturbance_cycles: float = 40.0
    transport_delay_cycles: int = 2
    noise: float = 0.3
    initial_wear: float = 0.1
    dropout_rate: float = 0.002
    test_rul_cycles: tuple[int, int] = (5, 150)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ConfigError(
                f"LineConfig.schema_version = {self.schema_version!r}; this EdgeGLM reads {SCHEMA_VERSION}",
                hint="upgrade EdgeGLM or write the config for schema_version 1",
            )
        self._check_machines()
        _check_int(self, "units_train", 1, 100_000)
        _check_int(self, "units_test", 1, 100_000)
        _check_range_pair(self, "life_cycles", 40, 10_000)
        _check_range_pair(self, "degradation_cycles", 10, self.life_cycles[0] - 1)
        self._check_regimes()
        _check_range_pair(self, "regime_dwell_cycles", 1, 10_000)
        _check_float(self, "fault_strength", 0.0, 20.0, low_open=True)
        _check_float(self, "coupling", 0.0, 1.0)
        _check_float(self, "disturbance", 0.0, 20.0)
        _check_float(self, "disturbance_cycles", 1.0, 10_000.0)
        _check_int(self, "transport_delay_cycles", 0, 100)
        _check_float(self, "noise", 0.0, 20.0)
        _check_float(self, "initial_wear", 0.0, 0.5)
        _check_float(self, "dropout_rate", 0.0, 0.2)
        _check_range_pair(self, "test_rul_cycles", 1, 10_000)

    def _check_machines(self) -> None:
        raw = self.machines
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (tuple, list)):
            raise ConfigError(
                f"LineConfig.machines = {raw!r}; valid: a list of 2–26 (name, kind) pairs",
                hint='write machines = [["inlet_pump", "pump"], ["main_motor", "motor"]]',
            )
        machines = []
        for m in raw:
            if isinstance(m, Machine):
                machines.append(m)
            elif isinstance(m, Mapping):
                machines.append(Machine(m.get("name"), m.get("kind")))
            elif isinstance(m, (tuple, list)) and len(m) == 2:
                machines.append(Machine(m[0], m[1]))
            else:
                raise ConfigError(
                    f"LineConfig.machines entry {m!r}; valid: a (name, kind) pair",
                    hint='write an entry as ["main_motor", "motor"]',
                )
        if not 2 <= len(machines) <= 26:
            raise ConfigError(
                f"LineConfig.machines has {len(machines)} machines; valid: 2 ≤ machines ≤ 26",
                hint="a line needs at least two machines to couple",
            )
        names = [m.name for m in machines]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"LineConfig.machines has duplicate names {names}; valid: unique names",
                hint="give every machine its own name",
            )
        object.__setattr__(self, "machines", tuple(machines))

    def _check_regimes(self) -> None:
        try:
            regimes = tuple((float(load), float(speed)) for load, speed in self.regimes)
        except (TypeError, ValueError):
            raise ConfigError(
                f"LineConfig.regimes = {self.regimes!r}; valid: 1–10 (load %, speed rpm) pairs",
                hint="write regimes = [[60, 1200], [80, 1500], [100, 1800]]",
            ) from None
        if not 1 <= len(regimes) <= 10 or len(set(regimes)) != len(regimes):
            raise ConfigError(
                f"LineConfig.regimes = {regimes!r}; valid: 1 ≤ distinct regimes ≤ 10",
                hint="list each (load %, speed rpm) setpoint once",
            )
        for load, speed in regimes:
            if not (0.0 < load <= 150.0 and 0.0 < speed <= 6000.0):
                raise ConfigError(
                    f"LineConfig.regimes has ({load}, {speed}); valid: 0 < load ≤ 150 %, 0 < speed ≤ 6000 rpm",
                    hint="use physical setpoints",
                )
        object.__setattr__(self, "regimes", regimes)

    # -- as data ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (machines as ``[name, kind]`` pairs)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "machines":
                v = [[m.name, m.kind.value] for m in v]
            elif f.name == "regimes":
                v = [list(r) for r in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LineConfig:
        """Build from a mapping (a TOML table); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown LineConfig keys {unknown}; known keys: {sorted(known)}",
                hint="check the spelling of the [factory] table's keys",
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    @property
    def sensor_names(self) -> tuple[str, ...]:
        """Every sensor of the line, machine by machine (the table's column order)."""
        return tuple(s for m in self.machines for s in m.sensors)

    def graph_edges(self) -> tuple[tuple[str, str, float], ...]:
        """The ground-truth sensor graph as ``(a, b, weight)`` triples.

        Sensors of one machine are fully connected; between neighbouring machines,
        the upstream machine's outlet sensor is connected to the downstream
        machine's drive current (the pair the fault coupling and the shared
        stream move together). All weights are 1.
        """
        edges: list[tuple[str, str, float]] = []
        for m in self.machines:
            names = m.sensors
            edges += [(a, b, 1.0) for i, a in enumerate(names) for b in names[i + 1 :]]
        for up, down in zip(self.machines[:-1], self.machines[1:], strict=True):
            edges.append((_sensor(up, _KINDS[up.kind].outlet), _sensor(down, _INLET), 1.0))
        return tuple(edges)


def _sensor(machine: Machine, q: Quantity) -> str:
    return f"{machine.name}.{q.value}"


def _fail(cfg: LineConfig, name: str, valid: str, hint: str) -> NoReturn:
    raise ConfigError(f"LineConfig.{name} = {getattr(cfg, name)!r} is out of range; valid: {valid}", hint=hint)


def _check_int(cfg: LineConfig, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        _fail(cfg, name, f"an integer with {lo} ≤ {name} ≤ {hi}", f"set {name} inside that range")
    object.__setattr__(cfg, name, int(v))


def _check_float(cfg: LineConfig, name: str, lo: float, hi: float, *, low_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    ok = ok and np.isfinite(v) and (lo < v if low_open else lo <= v) and v <= hi
    if not ok:
        _fail(cfg, name, f"{lo} {'<' if low_open else '≤'} {name} ≤ {hi}", f"set {name} inside that range")
    object.__setattr__(cfg, name, float(v))


def _check_range_pair(cfg: LineConfig, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    valid = f"a pair (min, max) of integers with {lo} ≤ min ≤ max ≤ {hi}"
    try:
        a, b = v
    except (TypeError, ValueError):
        _fail(cfg, name, valid, f"write {name} = [min, max]")
    ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (a, b))
    if not ints or not lo <= a <= b <= hi:
        _fail(cfg, name, valid, f"write {name} = [min, max] inside that range")
    object.__setattr__(cfg, name, (int(a), int(b)))


# -- the source string ------------------------------------------------------------------------


def _encode(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], Machine):
        return ",".join(f"{m.name}:{m.kind.value}" for m in value)
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(":".join(repr(x) for x in v) for v in value)
    if isinstance(value, tuple):
        return ",".join(repr(x) for x in value)
    return repr(value)


def _decode(name: str, text: str, default: Any) -> Any:
    if name == "machines":
        return tuple(tuple(item.split(":")) for item in text.split(","))
    if name == "regimes":
        return tuple(tuple(float(x) for x in item.split(":")) for item in text.split(","))
    if isinstance(default, tuple):
        return tuple(int(x) for x in text.split(","))
    return type(default)(text)


def _source(cfg: LineConfig, seed: int) -> str:
    default = LineConfig()
    params = [
        f"{f.name}={_encode(getattr(cfg, f.name))}"
        for f in fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name)
    ]
    if seed == 0 and not params:
        return _SOURCE_PREFIX
    return f"{_SOURCE_PREFIX}?" + "&".join([f"seed={seed}", *params])


def parse_factory_source(source: str) -> tuple[LineConfig, int]:
    """Turn a ``Dataset.source`` written by :func:`simulate_line` back into ``(config, seed)``.

    ``"factory"`` is the default config with seed 0; ``"factory?seed=3&noise=0.8"``
    overrides the seed and the named fields (tuples comma-separated, pairs as
    ``a:b``, machines as ``name:kind``).

    Raises:
        ConfigError: the string is not a factory source, or names an unknown field or bad value.
    """
    head, _, query = source.partition("?")
    if head != _SOURCE_PREFIX:
        raise ConfigError(f"data source {source!r} is not a factory source", hint="it must start with 'factory'")
    defaults = {f.name: getattr(LineConfig(), f.name) for f in fields(LineConfig)}
    seed, kwargs = 0, {}
    for item in filter(None, query.split("&")):
        key, _, text = item.partition("=")
        try:
            if key == "seed":
                seed = int(text)
            elif key in defaults:
                kwargs[key] = _decode(key, text, defaults[key])
            else:
                raise ConfigError(
                    f"factory source names unknown field {key!r}; known: seed, {', '.join(defaults)}",
                    hint="fix the data source string",
                )
        except ValueError:
            raise ConfigError(
                f"factory source has a bad value in {item!r}", hint="fix the data source string"
            ) from None
    return LineConfig(**kwargs), seed


# -- simulation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Per-sensor constants of a line, derived once from the config."""

    names: tuple[str, ...]
    machine_of: np.ndarray  # (S,) int, machine index of each sensor
    nominal: np.ndarray  # (S,) level at the reference point
    quantity: tuple[Quantity, ...]  # (S,)
    scale: np.ndarray  # (S,) c_s
    load: np.ndarray  # (S,) a_τ
    effect: np.ndarray  # (M, S) E, degradation signature incl. coupling

    @classmethod
    def of(cls, cfg: LineConfig) -> _Layout:
        names, machine_of, nominal, quantity = [], [], [], []
        seen: dict[MachineKind, int] = {}
        for i, m in enumerate(cfg.machines):
            size = 1.0 + 0.15 * seen.get(m.kind, 0)  # a second pump of the line is a bigger one
            seen[m.kind] = seen.get(m.kind, 0) + 1
            for q, level in _KINDS[m.kind].nominal.items():
                names.append(_sensor(m, q))
                machine_of.append(i)
                nominal.append(level if q is Quantity.TEMPERATURE else level * size)
                quantity.append(q)
        index = {n: j for j, n in enumerate(names)}
        effect = np.zeros((len(cfg.machines), len(names)))
        for j, q in enumerate(quantity):
            effect[machine_of[j], j] = _QUANTITIES[q].fault
        for i, (up, down) in enumerate(zip(cfg.machines[:-1], cfg.machines[1:], strict=True)):
            effect[i, index[_sensor(down, _INLET)]] += cfg.coupling  # downstream compensates
            effect[i + 1, index[_sensor(up, _KINDS[up.kind].outlet)]] += cfg.coupling  # upstream back-pressure
        return cls(
            names=tuple(names),
            machine_of=np.asarray(machine_of),
            nominal=np.asarray(nominal),
            quantity=tuple(quantity),
            scale=np.asarray([_QUANTITIES[q].scale for q in quantity]) * np.asarray(nominal),
            load=np.asarray([_QUANTITIES[q].load for q in quantity]),
            effect=effect,
        )

    def levels(self, settings: np.ndarray) -> np.ndarray:
        """``μ_s(load, speed)`` per row. Shapes: ``(T, 2)`` → ``(T, S)``."""
        load = settings[:, :1] / REFERENCE_LOAD_PCT
        speed = settings[:, 1:] / REFERENCE_SPEED_RPM
        out = np.empty((settings.shape[0], len(self.names)))
        for j, q in enumerate(self.quantity):
            n = self.nominal[j]
            if q is Quantity.VIBRATION or q is Quantity.FLOW:
                out[:, j] = n * speed[:, 0]
            elif q is Quantity.PRESSURE:
                out[:, j] = n * speed[:, 0] ** 2
            elif q is Quantity.CURRENT:
                out[:, j] = n * (0.3 + 0.7 * load[:, 0] * speed[:, 0])
            else:
                out[:, j] = AMBIENT_C + (n - AMBIENT_C) * load[:, 0]
        return out


@dataclass(frozen=True)
class _Unit:
    settings: np.ndarray  # (T, 2)
    sensors: np.ndarray  # (T, S), NaN = dropout
    failure_cycle: int
    onset_cycle: int
    faulty: int


def _regimes(rng: np.random.Generator, cfg: LineConfig, length: int) -> np.ndarray:
    """Regime index per cycle: dwell ~ U(regime_dwell_cycles), then switch to another regime."""
    k = len(cfg.regimes)
    out = np.empty(length, dtype=np.int64)
    t, current = 0, int(rng.integers(k))
    while t < length:
        dwell = int(rng.integers(cfg.regime_dwell_cycles[0], cfg.regime_dwell_cycles[1] + 1))
        out[t : t + dwell] = current
        t += dwell
        if k > 1:
            current = (current + int(rng.integers(1, k))) % k
    return out


def _disturbance(rng: np.random.Generator, cfg: LineConfig, length: int) -> np.ndarray:
    """Unit-variance AR(1) ``q`` of ``length`` cycles, started from its stationary law."""
    rho = 1.0 - 1.0 / cfg.disturbance_cycles
    eta = rng.standard_normal(length) * np.sqrt(1.0 - rho**2)
    eta[0] = rng.standard_normal()
    q = np.empty(length)
    acc = 0.0
    for t in range(length):
        acc = rho * acc + eta[t] if t else eta[0]
        q[t] = acc
    return q


def _dropouts(rng: np.random.Generator, rate: float, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of lost readings: bursts of 1 row or 2–6 rows, about ``rate`` of all cells."""
    mask = np.zeros(shape, dtype=bool)
    if rate == 0.0:
        return mask
    mean_burst = _BURST_SINGLE + (1 - _BURST_SINGLE) * (_BURST_LONG[0] + _BURST_LONG[1]) / 2
    rows, cols = np.nonzero(rng.random(shape) < rate / mean_burst)
    long = rng.random(rows.size) >= _BURST_SINGLE
    lengths = np.where(long, rng.integers(_BURST_LONG[0], _BURST_LONG[1] + 1, rows.size), 1)
    for r, c, n in zip(rows, cols, lengths, strict=True):
        mask[r : r + n, c] = True
    return mask


def _simulate_unit(rng: np.random.Generator, cfg: LineConfig, layout: _Layout) -> _Unit:
    """One run-to-failure trajectory of the whole line (the model in the module docstring)."""
    n_machines = len(cfg.machines)
    life = int(rng.integers(cfg.life_cycles[0], cfg.life_cycles[1] + 1))
    span = int(rng.integers(cfg.degradation_cycles[0], cfg.degradation_cycles[1] + 1))
    onset = life - span
    faulty = int(rng.integers(n_machines))
    rate = rng.uniform(*_CURVATURE) / span
    wear = rng.uniform(0.0, cfg.initial_wear, n_machines)

    t = np.arange(1, life + 1, dtype=np.float64)
    health = np.tile(wear, (life, 1))
    grow = np.expm1(rate * np.clip(t - onset, 0.0, None)) / np.expm1(rate * span)
    health[:, faulty] = wear[faulty] + (1.0 - wear[faulty]) * grow

    regime = _regimes(rng, cfg, life)
    settings = np.asarray(cfg.regimes)[regime] + rng.standard_normal((life, 2)) * np.asarray(_SETTING_JITTER)

    delay = cfg.transport_delay_cycles
    q = _disturbance(rng, cfg, life + delay * (n_machines - 1))
    # machine i sees the disturbance δ·i cycles late: q(t − δ·i)
    lag = delay * (n_machines - 1 - layout.machine_of)
    q_at = q[lag[None, :] + np.arange(life)[:, None]]

    noise = rng.standard_normal((life, len(layout.names)))
    bracket = cfg.disturbance * layout.load * q_at + cfg.fault_strength * (health @ layout.effect) + cfg.noise * noise
    sensors = layout.levels(settings) + layout.scale * bracket
    sensors[_dropouts(rng, cfg.dropout_rate, sensors.shape)] = np.nan
    return _Unit(settings, sensors, life, onset, faulty)


def _table(units: list[_Unit], layout: _Layout) -> SensorTable:
    lengths = [u.sensors.shape[0] for u in units]
    unit_ids = np.repeat(np.arange(1, len(units) + 1, dtype=np.int64), lengths)
    cycles = np.concatenate([np.arange(1, n + 1, dtype=np.int64) for n in lengths])
    rul = np.concatenate([u.failure_cycle - np.arange(1, n + 1) for u, n in zip(units, lengths, strict=True)]).astype(
        np.float64
    )
    return SensorTable(
        unit=unit_ids,
        cycle=cycles,
        settings=np.concatenate([u.settings for u in units]),
        sensors=np.concatenate([u.sensors for u in units]),
        rul=rul,
        setting_names=SETTING_NAMES,
        sensor_names=layout.names,
    )


def _truncate(rng: np.random.Generator, cfg: LineConfig, unit: _Unit) -> _Unit:
    """Cut a unit before failure, like a C-MAPSS test trajectory: RUL at the last row ~ U(test_rul_cycles)."""
    hi = min(cfg.test_rul_cycles[1], unit.failure_cycle - _MIN_TEST_ROWS)
    lo = min(cfg.test_rul_cycles[0], hi)
    keep = unit.failure_cycle - int(rng.integers(max(lo, 1), max(hi, 1) + 1))
    return _Unit(unit.settings[:keep], unit.sensors[:keep], unit.failure_cycle, unit.onset_cycle, unit.faulty)


def _split_meta(units: list[_Unit], cfg: LineConfig) -> dict[str, list]:
    return {
        "unit": list(range(1, len(units) + 1)),
        "failure_machine": [cfg.machines[u.faulty].name for u in units],
        "failure_cycle": [u.failure_cycle for u in units],
        "onset_cycle": [u.onset_cycle for u in units],
    }


def simulate_line(config: LineConfig | None = None, *, seed: int = 0) -> Dataset:
    """Simulate the factory line: ``units_train`` run-to-failure units and ``units_test`` truncated ones.

    Args:
        config: the line and its parameters (default: ``LineConfig()``).
        seed: non-negative integer; the same ``(config, seed)`` gives identical arrays (default: 0).

    Returns:
        ``Dataset(name="factory")`` with ``source`` as in the module docstring,
        ``graph_edges`` from :meth:`LineConfig.graph_edges` and ``meta`` holding
        ``machines`` (name, kind, sensors), ``units`` (physical unit per sensor quantity and
        setting), ``regimes``, ``seed``, ``config`` and, per split, ``unit``,
        ``failure_machine``, ``failure_cycle`` (train: the last cycle; test: the last cycle
        + true RUL) and ``onset_cycle`` lists in unit order.

    Raises:
        ConfigError: ``seed`` is not a non-negative integer.
    """
    cfg = config if config is not None else LineConfig()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed = {seed!r}; valid: an integer ≥ 0", hint="pass e.g. seed=0")
    seed = int(seed)
    layout = _Layout.of(cfg)
    train_seq, test_seq = np.random.SeedSequence(seed).spawn(2)
    train = [_simulate_unit(np.random.default_rng(s), cfg, layout) for s in train_seq.spawn(cfg.units_train)]
    test = []
    for s in test_seq.spawn(cfg.units_test):
        rng = np.random.default_rng(s)
        test.append(_truncate(rng, cfg, _simulate_unit(rng, cfg, layout)))
    units = {q.value: spec.unit for q, spec in _QUANTITIES.items()}
    units.update({"load_pct": "%", "speed_rpm": "rpm"})
    meta = {
        "machines": [{"name": m.name, "kind": m.kind.value, "sensors": list(m.sensors)} for m in cfg.machines],
        "units": units,
        "regimes": [list(r) for r in cfg.regimes],
        "seed": seed,
        "config": cfg.to_dict(),
        "train": _split_meta(train, cfg),
        "test": _split_meta(test, cfg),
    }
    return Dataset(
        name="factory",
        train=_table(train, layout),
        test=_table(test, layout),
        source=_source(cfg, seed),
        graph_edges=cfg.graph_edges(),
        meta=meta,
    )


def line_graph(config: LineConfig | None = None) -> SensorGraph:
    """The ground-truth sensor graph of the line (nodes in the table's sensor order)."""
    cfg = config if config is not None else LineConfig()
    return SensorGraph.from_edges(cfg.sensor_names, cfg.graph_edges())
