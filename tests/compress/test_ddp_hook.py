"""The Top-k DDP hook on a real 2-process gloo group: converges like dense all-reduce, counts its bytes."""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edgeglm.compress.ddp_hook import DenseHookState, TopKHookState, dense_allreduce_hook, topk_hook
from edgeglm.compress.sparsify import SparsifyConfig

WORLD = 2
STEPS = 300
RATIO = 0.01
WARMUP_STEPS = 30
HIDDEN = 64
# mode: (Top-k?, momentum, learning rate). Like is compared with like: plain SGD against Top-k with pure
# error feedback, momentum SGD against Top-k with DGC's momentum correction (the momentum then lives in
# the hook and the optimizer has none). Momentum correction needs the smaller step: a coordinate of a
# 64-element bucket is sent about every 64 steps, and its accumulated momentum arrives at once.
MODES = {
    "dense": (False, 0.0, 0.3),
    "topk": (True, 0.0, 0.3),
    "dense_momentum": (False, 0.9, 0.01),
    "topk_momentum": (True, 0.9, 0.01),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher network's output plus noise (the loss floor is the noise variance, 0.01)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    a = torch.randn(16, 16, generator=g) / 4
    b = torch.randn(16, 1, generator=g) / 4
    y = torch.tanh(x @ a) @ b + 0.1 * torch.randn(2048, 1, generator=g)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def _train(rank: int, mode: str) -> dict:
    model = _model()
    # a tiny bucket cap gives three buckets after DDP's rebuild at iteration 1 (one bucket before),
    # so per-bucket state and the bucket rebuild are exercised
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0001)
    sparse, momentum, lr = MODES[mode]
    if sparse:
        config = SparsifyConfig(ratio=RATIO, warmup_ratio=0.25, warmup_steps=WARMUP_STEPS, momentum=momentum)
        state = TopKHookState(config)
        ddp.register_comm_hook(state, topk_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    else:
        state = DenseHookState()
        ddp.register_comm_hook(state, dense_allreduce_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=momentum)
    x, y = _data()
    xs, ys = x[rank::WORLD], y[rank::WORLD]  # each rank trains on its own shard
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(xs), ys).backward()
        opt.step()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x), y).item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(replicas, flat)
    result = {
        "loss": loss,
        "replicas_equal": all(torch.equal(r, replicas[0]) for r in replicas),
        "bytes_sent": state.stats.bytes_sent,
        "bytes_dense": state.stats.bytes_dense,
        "iterations": state.stats.iterations,
        "numel": flat.numel(),
    }
    if sparse:
        sizes = [c.residual.numel() for c in state.compressors.values()]
        result["bucket_sizes"] = sizes
        result["expected_bytes"] = 4 * flat.numel() + sum(
            8 * config.k_at(step, n) for step in range(STEPS - 1) for n in sizes
        )
    return result


def _rebuild_from_first_iteration() -> dict:
    """Top-k from iteration 0 (start_iter=0): DDP's bucket rebuild must renew the compressors."""
    model = _model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0001)
    state = TopKHookState(SparsifyConfig(ratio=RATIO, momentum=0.0), start_iter=0)
    ddp.register_comm_hook(state, topk_hook)
    x, y = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            nn.functional.mse_loss(ddp(x), y).backward()
    return {
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "residual_sizes": [c.residual.numel() for c in state.compressors.values()],
    }


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {mode: _train(rank, mode) for mode in MODES}
        results["rebuild"] = _rebuild_from_first_iteration()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(
    ("dense", "topk", "tolerance"), [("dense", "topk", 1.05), ("dense_momentum", "topk_momentum", 1.08)]
)
def test_topk_at_one_percent_converges_like_dense(runs: list[dict], dense: str, topk: str, tolerance: float) -> None:
    start, dense_loss, topk_loss = _initial_loss(), runs[0][dense]["loss"], runs[0][topk]["loss"]
    assert dense_loss < 0.1 * start, "the dense baseline must learn the target for the comparison to mean anything"
    assert topk_loss <= dense_loss * tolerance, f"{topk} loss {topk_loss:.4f} vs {dense} {dense_loss:.4f}"
    for r in runs:
        assert r[dense]["replicas_equal"] and r[topk]["replicas_equal"]


def test_bytes_counted_are_about_ratio_times_dense(runs: list[dict]) -> None:
    for r in runs:
        dense = r["dense"]
        assert dense["iterations"] == r["dense_momentum"]["iterations"] == STEPS
        assert dense["bytes_sent"] == dense["bytes_dense"] == 4 * dense["numel"] * STEPS
        for topk in (r["topk"], r["topk_momentum"]):
            assert topk["iterations"] == STEPS
            assert topk["bytes_dense"] == dense["bytes_dense"]
            assert len(topk["bucket_sizes"]) > 1 and sum(topk["bucket_sizes"]) == topk["numel"]
            assert topk["bytes_sent"] == topk["expected_bytes"]
    # one entry is 8 bytes (int32 index + float32 value) against 4 per dense element, so after warm-up
    # a step sends 2 × ratio of dense; the first step is dense and warm-up starts at 25 %
    n, sizes = runs[0]["topk"]["numel"], runs[0]["topk"]["bucket_sizes"]
    config = SparsifyConfig(ratio=RATIO)
    per_step = sum(8 * config.k_at(0, s) for s in sizes) / (4 * n)
    assert per_step == pytest.approx(2 * RATIO, rel=0.1)
    assert runs[0]["topk"]["bytes_sent"] / runs[0]["topk"]["bytes_dense"] < 6 * RATIO


def _initial_loss() -> float:
    x, y = _data()
    with torch.no_grad():
        return nn.functional.mse_loss(_model()(x), y).item()


def test_bucket_rebuild_renews_the_compressor(runs: list[dict]) -> None:
    for r in runs:
        rebuild = r["rebuild"]
        assert any("bucket 0 changed its parameters" in w for w in rebuild["warnings"])
        assert sorted(rebuild["residual_sizes"]) == sorted(r["topk"]["bucket_sizes"])
