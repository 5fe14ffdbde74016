"""C-MAPSS loader: the real FD001 files (skipped without them) and malformed/synthetic files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgeglm.data.cmapss import (
    CMAPSS_ENV,
    SENSOR_NAMES,
    SETTING_NAMES,
    SUBSETS,
    find_cmapss,
    load_cmapss,
    read_cmapss_file,
    read_rul_file,
    recommended_conditions,
)
from edgeglm.data.table import Dataset
from edgeglm.errors import DataError
from edgeglm.windowing import fit_window_spec

STANDARD_14 = ("s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21")
STANDARD_DROPPED = ["s1", "s5", "s6", "s10", "s16", "s18", "s19"]

# Six FD002-like operating conditions: (altitude kft, Mach, throttle %).
CONDITION_CENTERS = np.array(
    [
        [0.0, 0.0, 100.0],
        [10.0, 0.25, 100.0],
        [20.0, 0.70, 100.0],
        [25.0, 0.62, 60.0],
        [35.0, 0.84, 100.0],
        [42.0, 0.84, 100.0],
    ]
)


# ---------------------------------------------------------------- synthetic files


def _rows(lengths: list[int], *, seed: int = 0, six_conditions: bool = False) -> np.ndarray:
    """Synthetic C-MAPSS rows, shape ``(sum(lengths), 26)``; every sensor noisy on a 0.01 grid."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    unit = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    cycle = np.concatenate([np.arange(1, k + 1) for k in lengths])
    if six_conditions:
        cond = np.arange(n) % 6
        settings = CONDITION_CENTERS[cond] + rng.normal(0, 1, (n, 3)) * [0.002, 0.0002, 0.0]
    else:
        settings = rng.normal(0, 1, (n, 3)) * [0.002, 0.0003, 0.0] + [0.0, 0.0, 100.0]
    sensors = np.round(100.0 + rng.normal(0, 1, (n, 21)), 2)
    return np.column_stack([unit, cycle, settings, sensors])


def _write_rows(path: Path, data: np.ndarray) -> Path:
    """Write rows in the C-MAPSS layout (space separated, trailing space, no header)."""
    np.savetxt(path, data, fmt=["%d", "%d"] + ["%.4f"] * (data.shape[1] - 2), delimiter=" ", newline=" \n")
    return path


def _write_subset(folder: Path, subset: str, train: np.ndarray, test: np.ndarray, rul: list[float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _write_rows(folder / f"train_{subset}.txt", train)
    _write_rows(folder / f"test_{subset}.txt", test)
    (folder / f"RUL_{subset}.txt").write_text("".join(f"{v:g} \n" for v in rul))
    return folder


def _row_line(unit: int, cycle: int) -> str:
    return " ".join([str(unit), str(cycle), "0.0001", "-0.0002", "100.0"] + ["518.67"] * 21) + " "


def _tiny_folder(tmp_path: Path) -> Path:
    """A valid FD001-like folder: 3 train units of 40/35/50 cycles, 3 test units of 12/20/8."""
    return _write_subset(tmp_path / "tiny", "FD001", _rows([40, 35, 50]), _rows([12, 20, 8], seed=1), [5, 17, 60])


# ---------------------------------------------------------------- the real FD001


@pytest.fixture(scope="module")
def fd001(cmapss_dir: Path) -> Dataset:
    return load_cmapss(cmapss_dir, "FD001")


@pytest.mark.cmapss
def test_fd001_counts(fd001: Dataset, cmapss_dir: Path) -> None:
    assert len(fd001.train) == 20631
    assert len(fd001.train.units) == 100
    assert len(fd001.test) == 13096
    assert len(fd001.test.units) == 100
    assert read_rul_file(cmapss_dir / "RUL_FD001.txt").shape == (100,)
    np.testing.assert_array_equal(fd001.train.units, np.arange(1, 101))


@pytest.mark.cmapss
def test_fd001_metadata_and_standard_sensors(fd001: Dataset, cmapss_dir: Path) -> None:
    assert fd001.name == "FD001"
    assert fd001.source == f"cmapss:{cmapss_dir.resolve()}?subset=FD001"
    assert fd001.graph_edges is None
    assert fd001.meta == {"subset": "FD001", "operating_conditions": 1, "dropped_sensors": STANDARD_DROPPED}
    assert fd001.train.sensor_names == STANDARD_14
    assert fd001.test.sensor_names == STANDARD_14
    assert fd001.train.setting_names == SETTING_NAMES
    assert fd001.train.sensors.shape == (20631, 14)


@pytest.mark.cmapss
def test_fd001_first_row_parsed_exactly(cmapss_dir: Path) -> None:
    raw = read_cmapss_file(cmapss_dir / "train_FD001.txt")
    assert raw.shape == (20631, 26)
    assert raw.dtype == np.float64
    np.testing.assert_array_equal(raw[0, :8], [1, 1, -0.0007, -0.0004, 100.0, 518.67, 641.82, 1589.70])
    assert raw[0, 25] == 23.4190


@pytest.mark.cmapss
def test_fd001_train_parses_fast(cmapss_dir: Path) -> None:
    path = cmapss_dir / "train_FD001.txt"
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        read_cmapss_file(path)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"parsing {path} took {best:.3f} s"


@pytest.mark.cmapss
def test_fd001_train_rul_counts_down_to_zero(fd001: Dataset) -> None:
    train = fd001.train
    for uid, sl in train.unit_slices():
        rul = train.rul[sl]
        assert rul[-1] == 0, f"unit {uid}"
        np.testing.assert_array_equal(np.diff(rul), -1.0)
        assert rul[0] == train.cycle[sl][-1] - 1
    assert train.rul[:3].tolist() == [191.0, 190.0, 189.0]  # unit 1 fails at cycle 192


@pytest.mark.cmapss
def test_fd001_test_rul_matches_rul_file(fd001: Dataset, cmapss_dir: Path) -> None:
    rul_file = read_rul_file(cmapss_dir / "RUL_FD001.txt")
    ids, last = fd001.test_targets()
    np.testing.assert_array_equal(ids, np.arange(1, 101))
    np.testing.assert_array_equal(last, rul_file)
    assert rul_file[:3].tolist() == [112.0, 98.0, 69.0]
    for _, sl in fd001.test.unit_slices():
        np.testing.assert_array_equal(np.diff(fd001.test.rul[sl]), -1.0)
    # unit 1 has 31 test cycles: RUL 112 + 30 at its first row
    assert fd001.test.rul[0] == 142.0


@pytest.mark.cmapss
def test_fd001_windows(fd001: Dataset, cmapss_dir: Path) -> None:
    spec = fit_window_spec(fd001.train, window=30, conditions=recommended_conditions("FD001"))
    lengths = [sl.stop - sl.start for _, sl in fd001.train.unit_slices()]
    w = spec.windows(fd001.train)
    assert len(w) == sum(max(0, n - 29) for n in lengths)
    assert w.x.shape == (len(w), 30, 14)

    last = spec.last_windows(fd001.test)
    rul_file = read_rul_file(cmapss_dir / "RUL_FD001.txt")
    assert len(last) == 100
    np.testing.assert_array_equal(last.y, np.minimum(rul_file, 125.0).astype(np.float32))
    assert last.y.max() == 125.0 and rul_file.max() > 125.0  # the cap is exercised


@pytest.mark.cmapss
def test_missing_subset_names_what_the_folder_holds(cmapss_dir: Path) -> None:
    with pytest.raises(DataError, match=r"train_FD002\.txt not found.*holds subsets: FD001") as info:
        load_cmapss(cmapss_dir, "FD002")
    assert CMAPSS_ENV in info.value.hint


# ---------------------------------------------------------------- names and locating the folder


def test_names() -> None:
    assert SUBSETS == ("FD001", "FD002", "FD003", "FD004")
    assert SETTING_NAMES == ("setting1", "setting2", "setting3")
    assert len(SENSOR_NAMES) == 21 and SENSOR_NAMES[0] == "s1" and SENSOR_NAMES[-1] == "s21"
    assert [recommended_conditions(s) for s in SUBSETS] == [1, 6, 1, 6]


def test_find_cmapss_prefers_explicit_path_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(CMAPSS_ENV, str(env))
    assert find_cmapss(explicit) == explicit.resolve()
    assert find_cmapss(str(explicit)) == explicit.resolve()
    assert find_cmapss() == env.resolve()


def test_find_cmapss_without_path_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CMAPSS_ENV, raising=False)
    with pytest.raises(DataError, match="EDGEGLM_CMAPSS is not set") as info:
        find_cmapss()
    assert CMAPSS_ENV in info.value.hint


def test_find_cmapss_env_folder_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CMAPSS_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone \(from \$EDGEGLM_CMAPSS\) does not exist"):
        find_cmapss()


# ---------------------------------------------------------------- synthetic, well-formed


def test_tiny_folder_labels(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path)
    ds = load_cmapss(str(folder))  # a str folder works too
    assert ds.source == f"cmapss:{folder.resolve()}?subset=FD001"
    assert ds.train.rul[:40].tolist() == list(range(39, -1, -1))
    assert ds.train.rul[40] == 34.0
    ids, last = ds.test_targets()
    assert ids.tolist() == [1, 2, 3]
    assert last.tolist() == [5.0, 17.0, 60.0]
    assert ds.test.rul[0] == 5 + 11 and ds.test.rul[12] == 17 + 19
    assert ds.meta["dropped_sensors"] == []
    assert ds.train.sensor_names == SENSOR_NAMES


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "train_FD001.txt"
    path.write_text("\n".join([_row_line(1, 1), "", _row_line(1, 2), "   ", ""]))
    data = read_cmapss_file(path)
    assert data.shape == (2, 26)
    assert data[:, 1].tolist() == [1.0, 2.0]


# ---------------------------------------------------------------- per-condition constant-sensor rule


def _with_condition_sensors(data: np.ndarray) -> np.ndarray:
    """Rewrite s1, s5, s6 and s10 of six-condition rows to exercise the near-constant rule."""
    data = data.copy()
    cond = np.arange(data.shape[0]) % 6
    col = {name: 5 + i for i, name in enumerate(SENSOR_NAMES)}
    data[:, col["s1"]] = 500.0 + 10.0 * cond  # constant per condition, differs between conditions
    data[:, col["s5"]] = 14.62 + 0.01 * (np.arange(data.shape[0]) % 50 == 0)  # flickers in its last digit
    data[:, col["s6"]] = np.where(cond == 5, data[:, col["s6"]], 21.61)  # varies in one condition only
    data[:, col["s10"]] = 1.30  # constant everywhere
    return data


def test_six_conditions_drop_sensors_constant_within_every_condition(tmp_path: Path) -> None:
    train = _with_condition_sensors(_rows([60, 72, 66], six_conditions=True))
    test = _with_condition_sensors(_rows([24, 30], seed=3, six_conditions=True))
    ds = load_cmapss(_write_subset(tmp_path, "FD002", train, test, [10, 20]), "FD002")
    assert ds.meta["operating_conditions"] == 6
    assert ds.meta["dropped_sensors"] == ["s1", "s5", "s10"]
    assert ds.train.sensor_names == tuple(n for n in SENSOR_NAMES if n not in ("s1", "s5", "s10"))
    assert ds.test.sensor_names == ds.train.sensor_names


def test_one_condition_keeps_a_sensor_that_only_changes_between_conditions(tmp_path: Path) -> None:
    # The same rows read as a one-condition subset: s1 now varies (500…550) and is kept.
    train = _with_condition_sensors(_rows([60, 72, 66], six_conditions=True))
    test = _with_condition_sensors(_rows([24, 30], seed=3, six_conditions=True))
    ds = load_cmapss(_write_subset(tmp_path, "FD003", train, test, [10, 20]), "FD003")
    assert ds.meta["operating_conditions"] == 1
    assert ds.meta["dropped_sensors"] == ["s5", "s10"]


def test_six_condition_subset_with_one_condition_of_settings(tmp_path: Path) -> None:
    folder = _write_subset(tmp_path, "FD004", _rows([40, 35]), _rows([12, 20], seed=1), [5, 17])
    with pytest.raises(DataError, match=r"train_FD004\.txt do not form 6 separated operating conditions"):
        load_cmapss(folder, "FD004")


# ---------------------------------------------------------------- malformed files


def test_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train_FD001.txt"
    short = " ".join(_row_line(1, 4).split()[:25])
    # line 2 is blank: line numbers count every line of the file
    path.write_text("\n".join([_row_line(1, 1), "", _row_line(1, 2), _row_line(1, 3), short, _row_line(1, 5)]))
    with pytest.raises(DataError) as info:
        read_cmapss_file(path)
    assert (
        str(info.value.message) == f"{path}: line 5: expected 26 fields (unit, cycle, 3 settings, 21 sensors), got 25"
    )
    assert info.value.hint


def test_too_many_columns(tmp_path: Path) -> None:
    path = tmp_path / "test_FD001.txt"
    path.write_text("\n".join([_row_line(1, 1), _row_line(1, 2) + " 7.5", _row_line(1, 3)]))
    with pytest.raises(DataError, match=r"test_FD001\.txt: line 2: expected 26 fields .*got 27"):
        read_cmapss_file(path)


def test_every_line_with_the_wrong_count_fails_at_line_one(tmp_path: Path) -> None:
    path = _write_rows(tmp_path / "train_FD001.txt", _rows([5])[:, :25])
    with pytest.raises(DataError, match=r"line 1: expected 26 fields .*got 25"):
        read_cmapss_file(path)


def test_non_numeric_field_is_quoted(tmp_path: Path) -> None:
    path = tmp_path / "train_FD001.txt"
    fields = _row_line(1, 3).split()
    fields[6] = "641.8x"
    path.write_text("\n".join([_row_line(1, 1), _row_line(1, 2), " ".join(fields)]) + "\n")
    with pytest.raises(DataError) as info:
        read_cmapss_file(path)
    assert info.value.message == f"{path}: line 3, field 7 (s2): '641.8x' is not a number"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "train_FD001.txt"
    with pytest.raises(DataError, match=r"train_FD001\.txt not found .*holds subsets: none") as info:
        read_cmapss_file(path)
    assert str(path) in info.value.message
    assert CMAPSS_ENV in info.value.hint


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"C-MAPSS folder .*absent does not exist") as info:
        load_cmapss(tmp_path / "absent")
    assert CMAPSS_ENV in info.value.hint


def test_missing_rul_file(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path)
    (folder / "RUL_FD001.txt").unlink()
    with pytest.raises(DataError, match=r"RUL_FD001\.txt not found .*holds subsets: FD001"):
        load_cmapss(folder)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "test_FD001.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=r"test_FD001\.txt is empty"):
        read_cmapss_file(path)
    rul = tmp_path / "RUL_FD001.txt"
    rul.write_text(text)
    with pytest.raises(DataError, match=r"RUL_FD001\.txt is empty"):
        read_rul_file(rul)


def test_rul_count_differs_from_test_units(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path)
    (folder / "RUL_FD001.txt").write_text("5\n17\n")
    with pytest.raises(DataError) as info:
        load_cmapss(folder)
    assert info.value.message == (
        f"{folder.resolve() / 'RUL_FD001.txt'} has 2 RUL values but "
        f"{folder.resolve() / 'test_FD001.txt'} has 3 test units"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12\n7 8\n", r"line 2: expected 1 field \(the true RUL of one test unit\), got 2"),
        ("12\n\nabc\n", r"line 3, field 1 \(rul\): 'abc' is not a number"),
        ("12\n-3\n", r"line 2: RUL -3 is not a finite number ≥ 0"),
    ],
)
def test_malformed_rul_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "RUL_FD001.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_rul_file(path)


def test_read_rul_file_values(tmp_path: Path) -> None:
    path = tmp_path / "RUL_FD001.txt"
    path.write_text("112 \n98 \n69 \n")
    rul = read_rul_file(path)
    assert rul.dtype == np.float64
    assert rul.tolist() == [112.0, 98.0, 69.0]


@pytest.mark.parametrize("subset", ["FD005", "fd001", ""])
def test_unknown_subset(tmp_path: Path, subset: str) -> None:
    with pytest.raises(DataError, match="valid subsets: FD001, FD002, FD003, FD004"):
        load_cmapss(_tiny_folder(tmp_path), subset)
    with pytest.raises(DataError, match="unknown C-MAPSS subset"):
        recommended_conditions(subset)


def test_lower_case_subset_hint() -> None:
    with pytest.raises(DataError) as info:
        recommended_conditions("fd002")
    assert "'FD002'" in info.value.hint


@pytest.mark.parametrize("cycle", [2, 3], ids=["backwards", "duplicate"])
def test_cycles_must_increase(tmp_path: Path, cycle: int) -> None:
    folder = _tiny_folder(tmp_path)
    lines = [_row_line(1, 1), _row_line(1, 2), _row_line(1, 3), _row_line(1, cycle), _row_line(2, 1)]
    (folder / "train_FD001.txt").write_text("\n".join(lines))
    expected = rf"train_FD001\.txt: line 4: unit 1 cycle {cycle} does not follow cycle 3 at line 3"
    with pytest.raises(DataError, match=expected):
        load_cmapss(folder)


def test_unit_rows_not_contiguous(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path)
    lines = [_row_line(1, 1), _row_line(1, 2), _row_line(2, 1), _row_line(1, 3)]
    (folder / "test_FD001.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"test_FD001\.txt: line 4: unit 1 comes after unit 2"):
        load_cmapss(folder)


def test_fractional_unit_id(tmp_path: Path) -> None:
    folder = _tiny_folder(tmp_path)
    lines = [_row_line(1, 1), _row_line(1, 2).replace("1 2 ", "1.5 2 ", 1)]
    (folder / "train_FD001.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"line 2, field 1 \(unit\) is 1.5; it must be an integer ≥ 1"):
        load_cmapss(folder)
