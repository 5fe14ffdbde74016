"""Data-parallel training: two gloo workers with the Top-k hook write a checkpoint `edgeglm evaluate` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeglm.checkpoint import load_checkpoint, load_model
from edgeglm.cli import main
from edgeglm.compress.sparsify import SparsifyConfig
from edgeglm.distributed import Optimizer, WorkerError, shard_indices, train_distributed
from edgeglm.errors import CheckpointError, ConfigError
from edgeglm.training import TrainConfig, evaluate

SMALL = "factory?seed=3&units_train=12&units_test=5"
TINY = TrainConfig(epochs=2, batch_size=64, threads=1)


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ddp") / "topk"
    metrics = train_distributed(SMALL, out, workers=2, topk=0.01, train_config=TINY, progress=False)
    return out, metrics


def test_topk_run_writes_a_checkpoint_that_loads_and_evaluates(topk_run: tuple[Path, dict]) -> None:
    out, metrics = topk_run
    ckpt = load_checkpoint(out)
    assert ckpt.source == SMALL
    assert ckpt.metrics["test_rmse"] == pytest.approx(metrics["test_rmse"])
    model = load_model(ckpt)
    test = evaluate(model, ckpt.window_spec.last_windows(_dataset().test))
    assert test["rmse"] == pytest.approx(metrics["test_rmse"], rel=1e-5)
    assert main(["evaluate", str(out), "--json"]) == 0


def test_topk_run_counts_the_bytes_of_every_rank(topk_run: tuple[Path, dict]) -> None:
    _, metrics = topk_run
    assert metrics["workers"] == 2 and metrics["hook"] == "topk" and metrics["topk"] == 0.01
    per_rank = metrics["bytes_sent_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] == metrics["bytes_sent"] > 0
    # dense all-reduce hands over 4 bytes per parameter per step
    assert metrics["bytes_dense"] == 4 * metrics["params"] * metrics["steps"]
    # the first step is dense (DDP rebuilds its buckets), the rest send 8 bytes per kept entry
    assert metrics["compression_ratio"] == pytest.approx(metrics["bytes_dense"] / metrics["bytes_sent"])
    assert metrics["compression_ratio"] > 10
    assert metrics["epochs_run"] == len(metrics["history"]) == 2
    assert json.loads((topk_run[0] / "metrics.json").read_text())["bytes_sent_per_rank"] == per_rank


def test_shards_are_disjoint_equal_and_cover_the_windows() -> None:
    n, world = 103, 4
    shards = [shard_indices(n, world_size=world, rank=r, epoch=3, seed=0) for r in range(world)]
    assert {len(s) for s in shards} == {26}  # ⌈103 / 4⌉, padded by wrapping
    assert set().union(*shards) == set(range(n))
    assert sum(len(s) for s in shards) - n == 1  # one padded window
    assert shard_indices(n, world_size=world, rank=0, epoch=4, seed=0) != shards[0]  # reshuffled per epoch
    assert shard_indices(n, world_size=world, rank=0, epoch=3, seed=0) == shards[0]  # deterministic


def test_cli_rejects_topk_without_workers(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", SMALL, "--topk", "0.01", "--epochs", "1"]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "--topk" in err and "hint: add --workers 2" in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workers": 0}, "workers must be"),
        ({"workers": 2, "topk": 1.5}, "not a fraction"),
        ({"workers": 2, "topk": 0.01, "sparsify_config": SparsifyConfig(ratio=0.001)}, "disagrees"),
        ({"workers": 2, "sparsify_config": SparsifyConfig(ratio=0.01, momentum=0.9)}, "needs the SGD optimizer"),
        ({"workers": 2, "topk": 0.01, "optimizer": "lion"}, "unknown optimizer"),
    ],
)
def test_bad_combinations_fail_before_any_worker_starts(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train_distributed(SMALL, None, train_config=TINY, progress=False, **kwargs)


def test_under_torchrun_workers_must_match_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4"):
        train_distributed(SMALL, None, workers=2, train_config=TINY, progress=False)


@pytest.mark.slow
def test_momentum_correction_runs_with_plain_sgd() -> None:
    sgd = train_distributed(
        SMALL,
        None,
        workers=2,
        sparsify_config=SparsifyConfig(ratio=0.01, momentum=0.9, clip_norm=5.0),
        optimizer=Optimizer.SGD,
        train_config=TrainConfig(epochs=1, batch_size=64, threads=1, lr=0.01),
        progress=False,
    )
    assert sgd["optimizer"] == "sgd" and sgd["sparsify"]["momentum"] == 0.9


@pytest.mark.slow
def test_a_failing_worker_raises_in_the_parent_with_its_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises((WorkerError, CheckpointError), match="training worker rank 0"):
        train_distributed(
            SMALL, blocker / "ckpt", workers=2, train_config=TrainConfig(epochs=1, threads=1), progress=False
        )


def _dataset():
    from edgeglm.data.source import load_source

    return load_source(SMALL)
