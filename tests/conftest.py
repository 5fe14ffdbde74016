"""Shared fixtures: where the C-MAPSS data lives (skip with a reason where it does not)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    from edgeglm.compress.pipeline import compress_checkpoint
    from edgeglm.compress.recipe import parse_recipe
    from edgeglm.training import TrainConfig, train_from_source

    out = tmp_path_factory.mktemp("compressed")
    _, ckpt, _ = train_from_source(
        "factory?seed=0&units_train=8&units_test=4",
        out / "checkpoint",
        model="mlp",
        window=16,
        train_config=TrainConfig(epochs=2),
        progress=False,
    )
    recipe = parse_recipe(
        '[recipe]\nname = "tiny-int8"\nschema_version = 1\n[[pass]]\nkind = "quantize"\naccuracy_budget = 100.0\n'
    )
    compress_checkpoint(ckpt, out / "compressed", recipe=recipe, progress=False, latency_runs=5, log=lambda *a: None)
    return out / "compressed"


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key, public key) written by ``edgeglm.signing.generate_keypair``."""
    from edgeglm.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys") / "fleet.key")
