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
