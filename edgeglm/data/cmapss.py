"""NASA C-MAPSS turbofan run-to-failure data as a :class:`~edgeglm.data.table.Dataset` (numpy only).

Reference: A. Saxena, K. Goebel, D. Simon, N. Eklund, "Damage Propagation Modeling
for Aircraft Engine Run-to-Failure Simulation", PHM08.

Files (one folder, ``FDxxx`` one of :data:`SUBSETS`)::

    train_FDxxx.txt   run-to-failure trajectories
    test_FDxxx.txt    trajectories cut off some time before failure
    RUL_FDxxx.txt     true RUL after the last test cycle, one line per test unit, in unit order

Every data row is 26 whitespace-separated numbers (no header, trailing spaces)::

    unit  cycle  setting1 setting2 setting3  s1 … s21

Labels follow the standard protocol, with ``T_u`` the last cycle of unit ``u``::

    train:  rul(u, t) = T_u − t                       (the last train cycle is the failure)
    test:   rul(u, t) = RUL_FDxxx[u] + (T_u − t)

Rows of a unit must be contiguous with strictly increasing cycles, and units must
appear in ascending id order (what the NASA files do); otherwise a :class:`DataError`
names the file and line.

Near-constant sensors are dropped, judged on the train split only. A sensor is
near-constant in a group of rows when its standard deviation is below half its
reporting step (the smallest gap between two of its distinct values)::

    near_constant(v) ⇔  std(v) < 0.5 · min_{a<b distinct in v} (b − a)     (one distinct value ⇒ true)

i.e. the reading only flickers in its last printed digit and carries no trend.
FD001/FD003 have one operating condition and the rule is applied to all rows; it
drops ``s1 s5 s6 s10 s16 s18 s19`` and keeps the standard 14 sensors (in FD001,
s6 takes two values, 21.60 and 21.61, with std/step ≈ 0.14; the least varying kept
sensor, s17, has std/step ≈ 1.5). FD002/FD004 have six operating conditions: the
train rows are split by condition (settings space) and a sensor is dropped only if
it is near-constant within every condition — a sensor that is constant per
condition but differs between conditions says nothing about wear.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeglm.data.table import Dataset, SensorTable
from edgeglm.errors import DataError

__all__ = [
    "CMAPSS_ENV",
    "SENSOR_NAMES",
    "SETTING_NAMES",
    "SUBSETS",
    "find_cmapss",
    "load_cmapss",
    "read_cmapss_file",
    "read_rul_file",
    "recommended_conditions",
]

CMAPSS_ENV = "EDGEGLM_CMAPSS"
"""Environment variable naming the folder that holds the C-MAPSS text files."""

SUBSETS: tuple[str, ...] = ("FD001", "FD002", "FD003", "FD004")
SETTING_NAMES: tuple[str, ...] = ("setting1", "setting2", "setting3")
SENSOR_NAMES: tuple[str, ...] = tuple(f"s{i}" for i in range(1, 22))

_COLUMNS: tuple[str, ...] = ("unit", "cycle", *SETTING_NAMES, *SENSOR_NAMES)
_NUM_COLUMNS = len(_COLUMNS)  # 26
_ROW_LAYOUT = "26 fields (unit, cycle, 3 settings, 21 sensors)"
_RUL_LAYOUT = "1 field (the true RUL of one test unit)"
_CONDITIONS = {"FD001": 1, "FD002": 6, "FD003": 1, "FD004": 6}
_FLICKER_RATIO = 0.5  # near-constant: std below this fraction of the reporting step
_LOCATE_HINT = (
    f"put train_FDxxx.txt, test_FDxxx.txt and RUL_FDxxx.txt in one folder and pass that folder "
    f"(data source 'cmapss:<folder>?subset=FD001'), or set {CMAPSS_ENV}=<folder>"
)


def find_cmapss(path: str | Path | None = None) -> Path:
    """Resolve the C-MAPSS folder: ``path`` if given, else ``$EDGEGLM_CMAPSS``.

    Args:
        path: an explicit folder (default: ``None``, use the environment variable).

    Returns:
        The absolute folder path.

    Raises:
        DataError: neither is set, or the chosen folder does not exist.
    """
    if path is not None and str(path) != "":
        origin, folder = "the given path", Path(path)
    elif os.environ.get(CMAPSS_ENV):
        origin, folder = f"${CMAPSS_ENV}", Path(os.environ[CMAPSS_ENV])
    else:
        raise DataError("no C-MAPSS folder given and $EDGEGLM_CMAPSS is not set", hint=_LOCATE_HINT)
    folder = folder.expanduser()
    if not folder.is_dir():
        raise DataError(f"C-MAPSS folder {folder} (from {origin}) does not exist", hint=_LOCATE_HINT)
    return folder.resolve()


def recommended_conditions(subset: str) -> int:
    """Number of operating conditions of a subset: 1 (FD001, FD003) or 6 (FD002, FD004).

    Pass it to :func:`edgeglm.windowing.fit_window_spec` as ``conditions=``.

    Raises:
        DataError: ``subset`` is not one of :data:`SUBSETS`.
    """
    _check_subset(subset)
    return _CONDITIONS[subset]


def read_cmapss_file(path: Path) -> np.ndarray:
    """Parse one ``train_``/``test_`` file into its numbers.

    Parsing takes the fast path (``np.loadtxt``); only when that fails are the lines
    walked one by one to name the first bad one. Blank lines are skipped but counted
    in line numbers.

    Args:
        path: the text file.

    Returns:
        The rows, shape ``(rows, 26)`` float64: unit, cycle, 3 settings, 21 sensors.

    Raises:
        DataError: the file is missing, empty, has a line without exactly 26 fields
            or a field that is not a number (the message names the file and 1-based line).
    """
    data, _ = _read_numbers(Path(path), _COLUMNS, _ROW_LAYOUT)
    return data


def read_rul_file(path: Path) -> np.ndarray:
    """Parse an ``RUL_FDxxx.txt`` file: one non-negative number per line, in unit order.

    Args:
        path: the text file.

    Returns:
        True RUL after the last cycle of each test unit, shape ``(units,)`` float64.

    Raises:
        DataError: the file is missing, empty, or a line holds other than one
            non-negative number (the message names the file and 1-based line).
    """
    path = Path(path)
    data, lines = _read_numbers(path, ("rul",), _RUL_LAYOUT)
    rul = data[:, 0]
    bad = np.flatnonzero(~(np.isfinite(rul) & (rul >= 0)))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path}: line {lines[i]}: RUL {rul[i]:g} is not a finite number ≥ 0",
            hint="each line of an RUL file is the remaining life (cycles) of one test unit; fix that line",
        )
    return rul


def load_cmapss(folder: Path | str, subset: str = "FD001") -> Dataset:
    """Load one C-MAPSS subset with RUL labels and near-constant sensors dropped.

    See the module docstring for the RUL protocol and the near-constant rule.

    Args:
        folder: the folder holding ``train_<subset>.txt``, ``test_<subset>.txt`` and
            ``RUL_<subset>.txt``.
        subset: one of :data:`SUBSETS` (default: ``"FD001"``).

    Returns:
        A :class:`Dataset` named ``subset`` whose tables keep all 3 settings and the
        informative sensors (in ``s1…s21`` order). ``source`` is
        ``"cmapss:<absolute folder>?subset=<subset>"``; ``graph_edges`` is ``None``;
        ``meta`` holds ``subset``, ``operating_conditions`` (1 or 6) and
        ``dropped_sensors`` (names).

    Raises:
        DataError: unknown subset, missing folder or file, malformed line, units out
            of order or cycles not increasing, RUL count ≠ number of test units,
            settings that do not form the subset's operating conditions.
    """
    _check_subset(subset)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"C-MAPSS folder {root} does not exist", hint=_LOCATE_HINT)
    root = root.resolve()
    train_path, test_path, rul_path = (root / f"{p}_{subset}.txt" for p in ("train", "test", "RUL"))

    train_data, train_lines = _read_numbers(train_path, _COLUMNS, _ROW_LAYOUT)
    test_data, test_lines = _read_numbers(test_path, _COLUMNS, _ROW_LAYOUT)
    for path, data, lines in ((train_path, train_data, train_lines), (test_path, test_data, test_lines)):
        _check_values(path, data, lines)
        _check_order(path, data, lines)
    rul_last = read_rul_file(rul_path)

    n_test_units = _unit_bounds(test_data[:, 0])[0].shape[0]
    if rul_last.shape[0] != n_test_units:
        raise DataError(
            f"{rul_path} has {rul_last.shape[0]} RUL values but {test_path} has {n_test_units} test units",
            hint="the RUL file needs exactly one line per test unit, in unit order; "
            "check that both files are from the same subset and complete",
        )
    train_rul = _rul_per_row(train_data, np.zeros(_unit_bounds(train_data[:, 0])[0].shape[0]))
    test_rul = _rul_per_row(test_data, rul_last)

    conditions = _CONDITIONS[subset]
    labels = _condition_labels(train_data[:, 2:5], conditions, train_path)
    sensors = train_data[:, 5:]
    dropped = [
        name
        for j, name in enumerate(SENSOR_NAMES)
        if all(_near_constant(sensors[labels == c, j]) for c in range(conditions))
    ]
    if len(dropped) == len(SENSOR_NAMES):
        raise DataError(
            f"every sensor of {train_path} is near-constant; nothing is left to learn from",
            hint="check that the file holds C-MAPSS run-to-failure data (re-copy it from the source)",
        )
    keep = tuple(n for n in SENSOR_NAMES if n not in dropped)
    return Dataset(
        name=subset,
        train=_table(train_data, train_rul).select_sensors(keep),
        test=_table(test_data, test_rul).select_sensors(keep),
        source=f"cmapss:{root}?subset={subset}",
        graph_edges=None,
        meta={"subset": subset, "operating_conditions": conditions, "dropped_sensors": dropped},
    )


def _check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        hint = f"use one of {', '.join(SUBSETS)}"
        if isinstance(subset, str) and subset.upper() in SUBSETS:
            hint = f"subset names are upper case: use {subset.upper()!r}"
        raise DataError(f"unknown C-MAPSS subset {subset!r}; valid subsets: {', '.join(SUBSETS)}", hint=hint)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"C-MAPSS file {path} not found{_folder_note(path.parent)}", hint=_LOCATE_HINT)
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror}", hint="check the file's permissions and that it is a file"
        ) from exc


def _folder_note(folder: Path) -> str:
    """`` (folder … holds subsets …)`` to help when a subset or folder is mistyped."""
    if not folder.is_dir():
        return f" (folder {folder} does not exist)"
    have = sorted(s for s in SUBSETS if (folder / f"train_{s}.txt").is_file())
    return f" (folder {folder} holds subsets: {', '.join(have) or 'none'})"


def _read_numbers(path: Path, columns: tuple[str, ...], layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``len(columns)`` numbers and the 1-based line number of each row.

    Shapes: ``(rows, len(columns))`` float64 and ``(rows,)`` int64.
    """
    lines = _read_text(path).split("\n")
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    if not numbers:
        raise DataError(
            f"{path} is empty (no data lines)",
            hint="the file was truncated or not copied; copy it again from the C-MAPSS distribution",
        )
    rows = lines if len(numbers) == len(lines) else [lines[i - 1] for i in numbers]
    try:
        data = np.loadtxt(rows, dtype=np.float64, comments=None, ndmin=2)
    except ValueError as exc:
        _raise_bad_line(path, rows, numbers, columns, layout)
        raise DataError(f"{path}: {exc}", hint="fix or remove the offending line") from exc
    if data.shape[1] != len(columns):
        _raise_bad_line(path, rows, numbers, columns, layout)
    return data, np.asarray(numbers, dtype=np.int64)


def _raise_bad_line(path: Path, rows: list[str], numbers: list[int], columns: tuple[str, ...], layout: str) -> None:
    """Walk the lines and raise :class:`DataError` for the first malformed one (slow path)."""
    for number, line in zip(numbers, rows, strict=True):
        fields = line.split()
        if len(fields) != len(columns):
            raise DataError(
                f"{path}: line {number}: expected {layout}, got {len(fields)}",
                hint="each line is whitespace-separated numbers; the file may be truncated or edited — "
                "fix that line or copy the file again",
            )
        for j, field in enumerate(fields):
            if not _is_number(field):
                raise DataError(
                    f"{path}: line {number}, field {j + 1} ({columns[j]}): {field!r} is not a number",
                    hint="every field is a decimal number; fix or remove that line",
                )


def _is_number(field: str) -> bool:
    if "_" in field:  # float() accepts "1_000", np.loadtxt does not
        return False
    try:
        float(field)
    except ValueError:
        return False
    return True


def _check_values(path: Path, data: np.ndarray, lines: np.ndarray) -> None:
    """Unit and cycle are integers ≥ 1, settings finite, sensors finite or NaN (a dropout)."""
    ids = data[:, :2]
    bad_ids = ~(np.isfinite(ids) & (ids >= 1) & (ids == np.round(ids)))
    bad = np.concatenate([bad_ids, ~np.isfinite(data[:, 2:5]), np.isinf(data[:, 5:])], axis=1)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        what = "an integer ≥ 1" if j < 2 else "finite" if j < 5 else "finite (or nan for a dropout)"
        raise DataError(
            f"{path}: line {lines[i]}, field {j + 1} ({_COLUMNS[j]}) is {data[i, j]:g}; it must be {what}",
            hint="fix or remove that line",
        )


def _check_order(path: Path, data: np.ndarray, lines: np.ndarray) -> None:
    """Units ascending with contiguous rows; cycles strictly increasing within a unit."""
    unit, cycle = data[:, 0], data[:, 1]
    same = unit[1:] == unit[:-1]
    backwards = np.flatnonzero(same & (cycle[1:] <= cycle[:-1]))
    if backwards.size:
        i = int(backwards[0]) + 1
        raise DataError(
            f"{path}: line {lines[i]}: unit {unit[i]:.0f} cycle {cycle[i]:.0f} does not follow cycle "
            f"{cycle[i - 1]:.0f} at line {lines[i - 1]}; cycles must increase within a unit",
            hint="sort the rows by unit, then cycle, and remove duplicate cycles",
        )
    reordered = np.flatnonzero(~same & (unit[1:] < unit[:-1]))
    if reordered.size:
        i = int(reordered[0]) + 1
        raise DataError(
            f"{path}: line {lines[i]}: unit {unit[i]:.0f} comes after unit {unit[i - 1]:.0f}; units must "
            "appear in ascending order with all rows of a unit together",
            hint="sort the rows by unit, then cycle (the RUL file pairs its lines with units in that order)",
        )


def _unit_bounds(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and stop row of each unit (rows of a unit are contiguous). Shapes ``(units,)``."""
    change = np.flatnonzero(unit[1:] != unit[:-1]) + 1
    return np.concatenate([[0], change]), np.concatenate([change, [unit.shape[0]]])


def _rul_per_row(data: np.ndarray, rul_last: np.ndarray) -> np.ndarray:
    """``rul_last[u] + (T_u − cycle)`` per row. Shapes: ``(rows, 26)``, ``(units,)`` → ``(rows,)``."""
    starts, stops = _unit_bounds(data[:, 0])
    cycle = data[:, 1]
    return np.repeat(rul_last + cycle[stops - 1], stops - starts) - cycle


def _condition_labels(settings: np.ndarray, k: int, path: Path) -> np.ndarray:
    """Operating condition (0…k−1) of each row; the settings must form k separated clusters.

    Settings are scaled by their std; centers are picked farthest-first (which finds one
    point per cluster when clusters are tighter than their spacing); each row goes to its
    nearest center. Shapes: ``(rows, n_settings)`` → ``(rows,)`` int64.

    Raises:
        DataError: some row lies farther than a quarter of the closest center spacing from its
            center, so the settings are not k discrete conditions.
    """
    rows = settings.shape[0]
    if k == 1:
        return np.zeros(rows, dtype=np.int64)
    scale = settings.std(axis=0)
    scale[scale == 0] = 1.0
    z = settings / scale
    picked = [0]
    d2 = ((z - z[0]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        picked.append(int(np.argmax(d2)))
        d2 = np.minimum(d2, ((z - z[picked[-1]]) ** 2).sum(axis=1))
    centers = z[picked]
    dist = np.sqrt(((z[:, None, :] - centers[None]) ** 2).sum(axis=2))  # (rows, k)
    labels = np.argmin(dist, axis=1)
    gap = np.sqrt(((centers[:, None] - centers[None]) ** 2).sum(axis=2))
    spacing = gap[~np.eye(k, dtype=bool)].min()
    radius = dist[np.arange(rows), labels].max()
    if not radius < 0.25 * spacing:
        raise DataError(
            f"the settings of {path} do not form {k} separated operating conditions",
            hint="check that the file belongs to this subset (FD002/FD004 have 6 conditions, FD001/FD003 one)",
        )
    return labels.astype(np.int64)


def _near_constant(values: np.ndarray) -> bool:
    """std below ``_FLICKER_RATIO`` × the reporting step (see the module docstring). Shape ``(rows,)``."""
    v = values[np.isfinite(values)]
    distinct = np.unique(v)
    if distinct.shape[0] <= 1:
        return True
    return bool(v.std() < _FLICKER_RATIO * np.diff(distinct).min())


def _table(data: np.ndarray, rul: np.ndarray) -> SensorTable:
    return SensorTable(
        unit=data[:, 0].astype(np.int64),
        cycle=data[:, 1].astype(np.int64),
        settings=np.ascontiguousarray(data[:, 2:5]),
        sensors=np.ascontiguousarray(data[:, 5:]),
        rul=rul.astype(np.float64),
        setting_names=SETTING_NAMES,
        sensor_names=SENSOR_NAMES,
    )
