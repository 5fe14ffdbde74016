"""The distribution installs one top-level package, `edgeglm`, and the runtime stays torch-free."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("edgeglm-*.whl")
    return whl


def test_wheel_has_only_the_edgeglm_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"edgeglm"}
    for sub in ("compress", "runtime", "devices", "data", "models"):
        assert f"edgeglm/{sub}/__init__.py" in names, f"edgeglm.{sub} missing from the wheel"


def test_wheel_declares_the_console_script_and_extras(wheel: Path) -> None:
    zf = zipfile.ZipFile(wheel)
    meta_dir = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    entry = zf.read(f"{meta_dir}/entry_points.txt").decode()
    assert "edgeglm = edgeglm.cli:main" in entry
    meta = zf.read(f"{meta_dir}/METADATA").decode()
    runtime_reqs = [
        line for line in meta.splitlines() if line.startswith("Requires-Dist") and 'extra == "runtime"' in line
    ]
    assert runtime_reqs, "the runtime extra is missing"
    assert not any("torch" in line for line in runtime_reqs), "the runtime extra must not pull torch"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A subpackage added on disk but not in pyproject's package list would be missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {
        "edgeglm": REPO / "edgeglm",
        "edgeglm.compress": REPO / "compress",
        "edgeglm.runtime": REPO / "runtime",
        "edgeglm.devices": REPO / "devices",
    }
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found == listed
