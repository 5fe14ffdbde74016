"""Shared fixtures: where the C-MAPSS data lives (skip with a reason where it does not), the small
compressed model, the signing key and the runtime tests' bundles (see ``tests/runtime_fixtures.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runtime_fixtures import ENV_VAR as FIXTURES_ENV
from runtime_fixtures import (
    RuntimeFixtures,
    build_fixtures,
    host_profile,
    load_fixtures,
    make_compressed,
)

REPO = Path(__file__).resolve().parents[1]
#: Set (to the emulator's name) where the CPU is emulated, as in ``make test-arm``: wall-clock
#: figures mean nothing there, so tests marked ``timing`` are skipped.
EMULATED_ENV = "EDGEGLM_EMULATED"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"timing: asserts wall-clock speed (throughput, latency); skipped under CPU emulation (${EMULATED_ENV})",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    emulator = os.environ.get(EMULATED_ENV)
    if not emulator:
        return
    skip = pytest.mark.skip(reason=f"timing means nothing under emulation ({emulator}); only correctness counts here")
    for item in items:
        if "timing" in item.keywords:
            item.add_marker(skip)


def cmapss_path() -> Path | None:
    """``$EDGEGLM_CMAPSS``, else ``../shared/datasets/cmapss`` beside the repo, else None."""
    env = os.environ.get("EDGEGLM_CMAPSS")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "datasets" / "cmapss")
    for c in candidates:
        if (c / "train_FD001.txt").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def cmapss_dir() -> Path:
    path = cmapss_path()
    if path is None:
        pytest.skip("C-MAPSS FD001 not found: set EDGEGLM_CMAPSS to the folder holding train_FD001.txt")
    return path


@pytest.fixture(scope="session")
def compressed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``edgeglm compress`` output folder, made small: a tiny MLP trained for 2 epochs on
    the simulator, then an INT8-only recipe (≈ 20 s). Shared by the bundle, flash and runtime tests."""
    pytest.importorskip("torch", reason="training and compressing the test model needs torch (main venv)")
    return make_compressed(tmp_path_factory.mktemp("compressed"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key, public key) written by ``edgeglm.signing.generate_keypair``; with
    ``$EDGEGLM_TEST_FIXTURES``, the pair the fixtures there are signed with."""
    if os.environ.get(FIXTURES_ENV):
        fx = load_fixtures(Path(os.environ[FIXTURES_ENV]))
        return fx.private_key, fx.public_key
    from edgeglm.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "fleet.key")


@pytest.fixture(scope="session")
def runtime_fixtures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RuntimeFixtures:
    """Signed bundles v1, v2, v3 and a bad-golden v3 for this machine's generic profile (see
    ``tests/runtime_fixtures.py``): read from ``$EDGEGLM_TEST_FIXTURES`` when set (a runtime-only
    venv, the arm64 root), else built here from ``compressed_dir`` with ``signing_key``."""
    if os.environ.get(FIXTURES_ENV):
        return load_fixtures(Path(os.environ[FIXTURES_ENV]))
    pytest.importorskip(
        "onnx",
        reason=f"building bundles needs onnx (main venv); elsewhere set {FIXTURES_ENV} to a folder "
        "written by `.venv/bin/python tests/runtime_fixtures.py build OUT`",
    )
    compressed = request.getfixturevalue("compressed_dir")
    keys = request.getfixturevalue("signing_key")
    built = build_fixtures(
        tmp_path_factory.mktemp("runtime-fixtures"), profiles=(host_profile(),), compressed=compressed, keys=keys
    )
    return built[host_profile()]
