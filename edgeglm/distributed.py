"""Data-parallel training on N processes (torch.distributed), with dense or Top-k gradient exchange.

Each of the ``N`` ranks holds a replica of the model (same seed, so the same
initial weights; DDP also broadcasts rank 0's at construction) and trains on its
own shard of the training windows. After every backward pass the ranks exchange
gradients through a DDP communication hook and all apply the same averaged
gradient, so the replicas stay identical::

    shard_r(epoch)  = DistributedSampler(n, N, r, seed).set_epoch(epoch)   ⌈n/N⌉ windows, padded by wrapping
    b               = ⌈batch_size / N⌉                                      per-rank batch; global ≈ batch_size
    ĝ               = (1/N) Σ_r g_r                                         dense all-reduce (the default)
    ĝ               = (1/N) Σ_r top-k(v_r)                                  Top-k with error feedback

The Top-k hook (:func:`edgeglm.compress.ddp_hook.topk_hook`) sends ``8k`` bytes
per bucket and step instead of ``4n``; both hooks count the payload each rank
hands to its collectives, so the metrics compare like with like.

Optimisation follows :func:`edgeglm.training.fit` (one-cycle learning rate,
MSE on ``y / rul_cap``, weight decay, gradient norm bound 5) with the optimizer
of :class:`Optimizer`: AdamW (the default, as single-process training) or SGD
with momentum. Dense and Top-k runs then differ only in the hook:

- the norm bound is applied to the averaged gradient after the all-reduce for
  dense (what :func:`fit` does) and, for Top-k, by each rank to its own gradient
  before accumulation (DGC's local clipping, ``5/√N`` per rank,
  ``SparsifyConfig.clip_norm``), since clipping the sparse sum would drop mass
  that error feedback is owed;
- with SGD, ``topk`` uses DGC momentum correction: the momentum moves into the
  hook (``SparsifyConfig.momentum``) and the optimizer runs with momentum 0, so
  at ``ρ = 1`` both are the same momentum SGD. With AdamW the hook is pure error
  feedback (``momentum=0``) and AdamW keeps its moments.

Measured on C-MAPSS FD001, 2 workers, 30 epochs (``benchmarks/topk.py``): at
``ρ = 0.1 %`` SGD + momentum correction (global batch 32, lr 0.02) lands within
1 % of dense SGD's test RMSE, while AdamW + error feedback loses ~5 % at batch 32
and ~40 % at batch 256. Every coordinate must be sent a few times per run:
``steps · ρ`` ≈ 13 at batch 32 against 1.7 at batch 256. Sparsity warm-up
(DGC's 75 % → 99.9 % over 4 epochs) would cost more bytes than the whole
remaining run sends here, so it is off by default. That recipe is
:data:`TOPK_TRAIN_DEFAULTS`, the one place it is written down: ``edgeglm train
--topk`` and ``benchmarks/topk.py`` train with it unless told otherwise, while
:func:`train_distributed` itself keeps :class:`TrainConfig`'s AdamW defaults
(pass ``TOPK_TRAIN_DEFAULTS.train_config(...)`` and ``optimizer=Optimizer.SGD``).

Rank 0 validates after every epoch, keeps the best weights, decides early
stopping and broadcasts the decision; at the end it evaluates the test windows
and writes the checkpoint exactly as :func:`edgeglm.training.train_from_source`
does, so ``edgeglm evaluate`` reads it.

Launch. :func:`train_distributed` spawns ``workers`` local processes (gloo,
``MASTER_ADDR=127.0.0.1`` and a free port), unless the process was started by
``torchrun`` (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set): then this process
is one rank and joins torchrun's group (``env://``), single- or multi-node::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-endpoint HOST:29500 \\
        -m edgeglm.cli train --workers 4 --topk 0.001 --data cmapss:/data/cmapss --out runs/fd001

Every collective has a timeout (``timeout_s``); a worker that fails stops the
others and its error is raised in the parent as :class:`WorkerError` with the
worker's message.

References: Lin et al., "Deep Gradient Compression", ICLR 2018,
https://arxiv.org/abs/1712.01887.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from edgeglm import errors
from edgeglm.checkpoint import save_checkpoint
from edgeglm.compress.ddp_hook import DenseHookState, TopKHookState, dense_allreduce_hook, topk_hook
from edgeglm.compress.sparsify import SparsifyConfig
from edgeglm.data.source import DataSource, load_source, parse_source
from edgeglm.data.table import Dataset
from edgeglm.errors import ConfigError, EdgeGLMError
from edgeglm.models import ModelConfig, build_model, count_parameters
from edgeglm.training import Prepared, TrainConfig, _progress, evaluate, make_model_config, prepare

__all__ = [
    "TOPK_TRAIN_DEFAULTS",
    "Optimizer",
    "TopKTrainDefaults",
    "WorkerError",
    "shard_indices",
    "steps_per_epoch",
    "topk_sparsify_config",
    "torchrun_world_size",
    "train_distributed",
]

#: Gradient norm bound, as in :func:`edgeglm.training.fit`.
CLIP_NORM = 5.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Optimizer(str, Enum):
    """The optimizer every rank steps after the gradient exchange.

    ``ADAMW`` is :func:`edgeglm.training.fit`'s (weight decay, one-cycle learning
    rate and β₁). ``SGD`` is SGD with ``momentum`` (0.9) and weight decay under the
    same one-cycle learning rate; with DGC momentum correction in the Top-k hook
    (``SparsifyConfig.momentum > 0``) the momentum lives in the hook and the
    optimizer runs with momentum 0, so dense (momentum in the optimizer) and
    Top-k (momentum in the hook) run the same momentum SGD at ``ρ = 1``.
    """

    ADAMW = "adamw"
    SGD = "sgd"


class WorkerError(EdgeGLMError):
    """A training worker failed; the message names the rank and the worker's error."""


@dataclass(frozen=True)
class TopKTrainDefaults:
    """How Top-k training runs unless told otherwise: the recipe ``benchmarks/topk.py`` measured.

    Top-k with error feedback sends a coordinate only once its accumulated residual is
    among the largest, so each coordinate's update arrives late and in one lump, about
    every ``1/ρ`` steps. Plain SGD applies that lump as the sum of the steps it stands
    for; with DGC momentum correction (the momentum lives in the hook, the optimizer has
    none) it is momentum SGD again at ``ρ = 1``. Adaptive optimizers fight the delayed
    updates: AdamW divides each lump by a second moment estimated mostly from the steps
    in which that coordinate was zero. The run also needs enough steps for every
    coordinate to be sent several times (``steps · ρ`` ≫ 1), hence the small batch.

    Measured on C-MAPSS FD001, 2 workers, 30 epochs, ``ρ = 0.1 %``, test RMSE of Top-k
    against dense with the same settings: this recipe +0.1 % (12.81 vs 12.80); AdamW,
    lr 2e-3, batch 256 (the dense defaults of :class:`TrainConfig`) +39 %; AdamW,
    lr 1e-3, batch 32 +4.9 %.

    Args:
        optimizer: the optimizer (default: :attr:`Optimizer.SGD`).
        lr: peak learning rate of the one-cycle schedule (default: 0.02).
        batch_size: global batch, split over the workers (default: 32).
        momentum: SGD momentum; with Top-k it is DGC momentum correction in the hook
            (default: 0.9).
        weight_decay: weight decay (default: 1e-4).
        warmup_epochs: epochs of sparsity warm-up, one stage per epoch; 0 disables it
            (default: 0: in a 30-epoch run DGC's 4-epoch warm-up sends ~13 times what the
            remaining epochs send and caps the compression near 40×).
        warmup_ratio: kept fraction at the start of a warm-up (default: 0.25, DGC's).
    """

    optimizer: Optimizer = Optimizer.SGD
    lr: float = 0.02
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    warmup_ratio: float = 0.25

    def train_config(self, **fields: Any) -> TrainConfig:
        """A :class:`TrainConfig` with this recipe's batch size, lr and weight decay.

        ``fields`` set the other :class:`TrainConfig` fields (epochs, patience, seed,
        threads) and may override the recipe's.
        """
        recipe = {"batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay}
        return TrainConfig(**{**recipe, **fields})


#: The Top-k training recipe (see :class:`TopKTrainDefaults`).
TOPK_TRAIN_DEFAULTS = TopKTrainDefaults()


@dataclass(frozen=True)
class _Job:
    """Everything a rank needs; pickled to spawned workers."""

    prepared: Prepared
    model_config: ModelConfig
    model_name: str
    source: str
    data_name: str
    train_config: TrainConfig
    sparsify: SparsifyConfig | None
    optimizer: Optimizer
    momentum: float
    out: str | None
    progress: bool
    threads: int
    timeout_s: float
    result_dir: str


def torchrun_world_size() -> int | None:
    """``WORLD_SIZE`` if torchrun launched this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set), else None."""
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return None
    return int(os.environ["WORLD_SIZE"])


def shard_indices(n: int, *, world_size: int, rank: int, epoch: int, seed: int) -> list[int]:
    """The training windows rank ``rank`` visits in ``epoch``, in order (torch's ``DistributedSampler``).

    Every rank draws the same permutation (seeded by ``seed + epoch``), pads it by
    wrapping to a multiple of ``world_size`` and takes every ``world_size``-th
    entry from ``rank``: the shards are disjoint up to the padding and of equal
    length ``⌈n / world_size⌉``, so every rank runs the same number of steps.
    """
    windows: Any = range(n)  # a sized sequence is all the sampler reads
    sampler = DistributedSampler(windows, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def steps_per_epoch(train_windows: int, *, workers: int, batch_size: int) -> int:
    """Optimizer steps per epoch on every rank: ``⌈⌈n / N⌉ / ⌈batch_size / N⌉⌉``.

    Use it to express :class:`SparsifyConfig` warm-up in epochs, e.g.
    ``warmup_steps = 4 * s, warmup_stage_steps = s`` for DGC's four-epoch warm-up.
    """
    return math.ceil(math.ceil(train_windows / workers) / math.ceil(batch_size / workers))


def topk_sparsify_config(
    ratio: float,
    *,
    momentum: float = TOPK_TRAIN_DEFAULTS.momentum,
    warmup_epochs: int = 0,
    steps_per_epoch: int = 1,
    warmup_ratio: float = TOPK_TRAIN_DEFAULTS.warmup_ratio,
) -> SparsifyConfig:
    """The Top-k hook's settings for data-parallel training at ``ratio``.

    DGC momentum correction with ``momentum`` (0: pure error feedback, for an optimizer
    with moments of its own), local clipping of each rank's gradient to
    ``CLIP_NORM / √N`` and, when ``warmup_epochs > 0``, a sparsity warm-up from
    ``warmup_ratio`` down to ``ratio`` in one stage per epoch of ``steps_per_epoch``
    steps (see :func:`steps_per_epoch`).

    Raises:
        ConfigError: a value :class:`SparsifyConfig` rejects.
    """
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ConfigError(
            f"train: Top-k warm-up epochs must be an integer ≥ 0, got {warmup_epochs!r}",
            hint="pass 0 (no warm-up, the default) or DGC's 4",
        )
    warmup_steps = warmup_epochs * steps_per_epoch
    return SparsifyConfig(
        ratio=ratio,
        warmup_ratio=max(ratio, warmup_ratio),
        warmup_steps=warmup_steps,
        warmup_stage_steps=steps_per_epoch if warmup_steps else 1,
        momentum=momentum,
        clip_norm=CLIP_NORM,
    )


def train_distributed(
    source: DataSource | str | Dataset,
    out: Path | None,
    *,
    workers: int,
    topk: float | None = None,
    topk_warmup_epochs: int = 0,
    model: str = "stgnn",
    graph_mode: str | None = None,
    window: int = 30,
    train_config: TrainConfig | None = None,
    sparsify_config: SparsifyConfig | None = None,
    optimizer: Optimizer = Optimizer.ADAMW,
    momentum: float = 0.9,
    subset: str | None = None,
    timeout_s: float = 300.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one model data-parallel on ``workers`` processes; rank 0 evaluates and writes the checkpoint.

    Args:
        source: a data source (string or parsed), or an in-memory :class:`Dataset`
            (its ``source`` string is what the checkpoint records).
        out: checkpoint folder rank 0 writes (None: metrics only).
        workers: number of ranks ``N`` (≥ 1). Under torchrun it must equal ``WORLD_SIZE``.
        topk: fraction of gradient entries each rank sends per step, e.g. 0.01; None
            exchanges dense gradients by all-reduce (the baseline, default).
        topk_warmup_epochs: epochs of sparsity warm-up for ``topk``, from 25 % of the
            entries down to ``topk`` in one stage per epoch (DGC uses 4; default: 0, none).
        model: a preset of :data:`edgeglm.training.MODEL_PRESETS` (default: ``"stgnn"``).
        graph_mode: STGNN sensor mixing (default: the preset's).
        window: cycles per window (default: 30).
        train_config: epochs, global batch size, peak lr, patience, seed, and
            ``threads`` per worker (default: :class:`TrainConfig`; threads default to
            ``cores // workers``, at least 1).
        sparsify_config: the Top-k settings besides the ratio (warm-up, momentum
            correction, selection); default ``SparsifyConfig(ratio=topk, clip_norm=5)``
            with ``momentum`` = the SGD ``momentum`` (DGC momentum correction) for SGD
            and 0 (pure error feedback) for AdamW, and ``topk_warmup_epochs`` of warm-up
            (:func:`topk_sparsify_config`). Its ``ratio`` must equal ``topk`` when both
            are given; given alone it turns Top-k on (its own warm-up then applies).
        optimizer: see :class:`Optimizer` (default: AdamW, as single-process training).
        momentum: SGD momentum, ignored by AdamW (default: 0.9).
        subset: C-MAPSS subset, overrides the source's.
        timeout_s: timeout of every collective and of the rendezvous, seconds (default: 300).
        progress: rank 0 shows a progress bar (default: True).

    Returns:
        The metrics dict that the checkpoint's ``metrics.json`` holds: test/val RMSE and
        score, epochs, ``bytes_sent`` (rank 0's gradient payload), ``bytes_sent_per_rank``,
        ``bytes_dense`` (what dense all-reduce would have sent for the same steps),
        ``compression_ratio``, ``steps``, ``train_seconds`` and ``seconds`` (wall time
        including process start-up).

    Raises:
        ConfigError: a bad combination (``workers`` < 1, ratio outside (0, 1], momentum
            correction with an optimizer that has momentum, warm-up epochs without
            ``topk`` or with ``sparsify_config``, torchrun world mismatch).
        WorkerError: a worker failed; the message carries its error.
    """
    started = time.perf_counter()
    cfg = train_config or TrainConfig()
    optimizer = _check_optimizer(optimizer, momentum)
    sparsify = _sparsify_for(topk, sparsify_config, optimizer, momentum, topk_warmup_epochs)
    if sparsify is not None and sparsify.momentum > 0 and optimizer is not Optimizer.SGD:
        raise ConfigError(
            f"train: Top-k momentum correction (sparsify momentum {sparsify.momentum}) needs the SGD optimizer, "
            f"not {optimizer.value}",
            hint="pass optimizer=Optimizer.SGD (the hook then carries the momentum), or sparsify momentum=0",
        )
    world = torchrun_world_size()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"train: workers must be an integer ≥ 1, got {workers!r}", hint="pass --workers 2 or more")
    if world is not None and world != workers:
        raise ConfigError(
            f"train: launched by torchrun with WORLD_SIZE={world}, but workers={workers}",
            hint=f"pass --workers {world} (torchrun's nnodes × nproc-per-node), or run without torchrun",
        )
    if not timeout_s > 0:
        raise ConfigError(f"train: timeout_s must be > 0, got {timeout_s!r}")

    if isinstance(source, Dataset):
        dataset, source_text = source, source.source
        try:
            conditions = parse_source(source_text).conditions
        except ConfigError:  # a data set of no known source: let the window spec find the regimes
            conditions = "auto"
    else:
        src = parse_source(source, subset=subset) if isinstance(source, str) else source
        dataset, source_text, conditions = load_source(src), str(src), src.conditions
    prepared = prepare(dataset, window=window, seed=cfg.seed, conditions=conditions)
    mcfg = make_model_config(model, prepared, graph_mode)
    if sparsify is not None and topk_warmup_epochs:  # the warm-up's stages are epochs: size them now
        per_epoch = steps_per_epoch(len(prepared.train), workers=workers, batch_size=cfg.batch_size)
        sparsify = topk_sparsify_config(
            sparsify.ratio, momentum=sparsify.momentum, warmup_epochs=topk_warmup_epochs, steps_per_epoch=per_epoch
        )
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if world is not None else workers
    threads = cfg.threads or max(1, _cores() // local_workers)

    with tempfile.TemporaryDirectory(prefix="edgeglm-ddp-") as result_dir:
        job = _Job(
            prepared=prepared,
            model_config=mcfg,
            model_name=model,
            source=source_text,
            data_name=dataset.name,
            train_config=cfg,
            sparsify=sparsify,
            optimizer=optimizer,
            momentum=momentum,
            out=str(out) if out is not None else None,
            progress=progress,
            threads=threads,
            timeout_s=timeout_s,
            result_dir=result_dir,
        )
        if world is not None:
            metrics = _run(job, rank=int(os.environ["RANK"]), world_size=world, init_method="env://")
        else:
            metrics = _spawn(job, workers)
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def _sparsify_for(
    topk: float | None, config: SparsifyConfig | None, optimizer: Optimizer, momentum: float, warmup_epochs: int
) -> SparsifyConfig | None:
    if warmup_epochs and (topk is None or config is not None):
        raise ConfigError(
            f"train: {warmup_epochs} Top-k warm-up epochs "
            + ("without topk" if topk is None else "next to sparsify_config, which has its own warm-up"),
            hint="pass topk and topk_warmup_epochs (--topk RATIO --topk-warmup EPOCHS), "
            "or set the warm-up in sparsify_config",
        )
    if topk is None:
        return config
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk <= 1.0:
        raise ConfigError(
            f"train: topk {topk!r} is not a fraction in (0, 1]",
            hint="pass the fraction of gradient entries to send, e.g. --topk 0.01 for 1 %",
        )
    if config is None:
        # SGD: DGC momentum correction (the momentum moves into the hook); AdamW: pure error feedback.
        hook_momentum = momentum if optimizer is Optimizer.SGD else 0.0
        # the warm-up is checked here and sized in steps once the data is loaded
        return topk_sparsify_config(float(topk), momentum=hook_momentum, warmup_epochs=warmup_epochs)
    if config.ratio != topk:
        raise ConfigError(
            f"train: topk {topk} disagrees with sparsify_config.ratio {config.ratio}",
            hint="give the ratio once: either topk or sparsify_config.ratio",
        )
    return config


def _check_optimizer(optimizer: Optimizer | str, momentum: float) -> Optimizer:
    try:
        opt = Optimizer(optimizer)
    except ValueError:
        known = ", ".join(o.value for o in Optimizer)
        raise ConfigError(f"train: unknown optimizer {optimizer!r}", hint=f"use one of: {known}") from None
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"train: momentum must lie in [0, 1), got {momentum!r}", hint="use 0.9")
    return opt


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- launch -------------------------------------------------------------------------------------


def _spawn(job: _Job, workers: int) -> dict[str, Any]:
    # The job (tens of MB of windows) goes through a file, not the spawn pipe: a worker that dies
    # while starting would leave the parent blocked writing to a pipe nobody reads.
    job_path = Path(job.result_dir) / "job.pkl"
    with job_path.open("wb") as f:
        pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
    port = _free_port()
    try:
        mp.spawn(_spawned_worker, args=(str(job_path), workers, port), nprocs=workers, join=True)
    except ProcessException as exc:
        raise _worker_error(Path(job.result_dir), exc) from exc
    return json.loads((Path(job.result_dir) / "result.json").read_text())


def _spawned_worker(rank: int, job_path: str, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    result_dir = Path(job_path).parent
    try:
        with open(job_path, "rb") as f:
            job: _Job = pickle.load(f)  # written by _spawn in this run's private temporary folder
        metrics = _run(job, rank=rank, world_size=world_size, init_method="env://")
    except BaseException as exc:
        report = {
            "rank": rank,
            "type": type(exc).__name__,
            "message": getattr(exc, "message", str(exc)),
            "hint": getattr(exc, "hint", None),
            "traceback": traceback.format_exc(),
        }
        (result_dir / f"error-{rank}.json").write_text(json.dumps(report))
        raise
    if rank == 0:
        (result_dir / "result.json").write_text(json.dumps(metrics))


def _worker_error(result_dir: Path, exc: ProcessException) -> EdgeGLMError:
    """The first failed rank's own error (an EdgeGLM error keeps its class), else a :class:`WorkerError`."""
    reports = sorted(
        (json.loads(p.read_text()) for p in result_dir.glob("error-*.json")),
        key=lambda r: (r["rank"] != exc.error_index, r["rank"]),
    )
    if not reports:  # killed by a signal, or died before Python could report
        return WorkerError(
            f"training worker rank {exc.error_index} died: {exc}",
            hint="the machine may be out of memory; try fewer --workers or a smaller --batch-size",
        )
    first = reports[0]
    cls = getattr(errors, first["type"], None)
    message = f"training worker rank {first['rank']}: {first['message']}"
    if isinstance(cls, type) and issubclass(cls, EdgeGLMError):
        return cls(message, hint=first["hint"])
    return WorkerError(
        f"training worker rank {first['rank']} failed with {first['type']}: {first['message']}",
        hint="the worker printed its traceback above; rerun with --workers 1 to debug in one process",
    )


# -- one rank -----------------------------------------------------------------------------------


def _run(job: _Job, *, rank: int, world_size: int, init_method: str) -> dict[str, Any]:
    torch.set_num_threads(job.threads)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=job.timeout_s)
    )
    try:
        return _train(job, rank, world_size)
    finally:
        dist.destroy_process_group()


def _train(job: _Job, rank: int, world_size: int) -> dict[str, Any]:
    cfg, p = job.train_config, job.prepared
    torch.manual_seed(cfg.seed)
    net = build_model(job.model_config, p.graph.normalized())
    ddp = DistributedDataParallel(net)
    if job.sparsify is None:
        state: DenseHookState | TopKHookState = DenseHookState()
        ddp.register_comm_hook(state, dense_allreduce_hook)
    else:
        state = TopKHookState(job.sparsify, seed=cfg.seed)
        ddp.register_comm_hook(state, topk_hook)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, like the data

    local_batch = math.ceil(cfg.batch_size / world_size)
    n = len(p.train)
    opt = _make_optimizer(job, net)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=cfg.epochs * steps_per_epoch(n, workers=world_size, batch_size=cfg.batch_size),
        pct_start=0.1,
        cycle_momentum=job.optimizer is Optimizer.ADAMW,
    )
    x_all, y_all = torch.from_numpy(p.train.x), torch.from_numpy(p.train.y)
    cap = p.spec.rul_cap
    clip_after = job.sparsify is None  # Top-k clips each rank's gradient inside the hook

    best_state, best_rmse, best_epoch = copy.deepcopy(net.state_dict()), math.inf, 0
    history: list[dict[str, float]] = []
    steps = 0
    started = time.perf_counter()
    with _progress(job.progress and rank == 0) as bar:
        hook = "dense" if job.sparsify is None else f"top-k {job.sparsify.ratio:g}"
        desc = f"{job.model_name} on {job.data_name}, {world_size} workers, {hook}"
        task = bar.add_task(desc, total=cfg.epochs, status="") if bar else None
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            ddp.train()
            order = torch.tensor(shard_indices(n, world_size=world_size, rank=rank, epoch=epoch, seed=cfg.seed))
            total = 0.0
            for i in range(0, len(order), local_batch):
                idx = order[i : i + local_batch]
                loss = nn.functional.mse_loss(ddp(x_all[idx]).reshape(-1) / cap, y_all[idx] / cap)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_after:
                    nn.utils.clip_grad_norm_(net.parameters(), CLIP_NORM)
                opt.step()
                sched.step()
                steps += 1
                total += float(loss.detach()) * len(idx)
            decision = torch.zeros(2)
            if rank == 0:
                val_rmse = evaluate(net, p.val)["rmse"]
                history.append({"epoch": epoch, "train_loss": total / len(order), "val_rmse": val_rmse})
                if val_rmse < best_rmse - 1e-4:
                    best_rmse, best_epoch = val_rmse, epoch
                    best_state = copy.deepcopy(net.state_dict())
                if bar is not None:
                    bar.update(task, advance=1, status=f"val RMSE {val_rmse:6.2f}  best {best_rmse:6.2f}@{best_epoch}")
                decision[0] = float(epoch - best_epoch >= cfg.patience)
            dist.broadcast(decision, src=0)
            if decision[0]:
                break
    train_seconds = time.perf_counter() - started

    stats = state.stats
    per_rank: list[Any] = [None] * world_size
    dist.all_gather_object(per_rank, (stats.bytes_sent, stats.bytes_dense, stats.iterations))
    metrics: dict[str, Any] | None = None
    if rank == 0:
        net.load_state_dict(best_state)
        net.eval()
        test = evaluate(net, p.test)
        metrics = {
            "data": job.data_name,
            "model": job.model_name,
            "params": count_parameters(net),
            "val_rmse": best_rmse,
            "test_rmse": test["rmse"],
            "test_score": test["score"],
            "test_units": test["n"],
            "best_epoch": best_epoch,
            "epochs_run": epoch,
            "train_seconds": train_seconds,
            "train_windows": n,
            "workers": world_size,
            "hook": "dense" if job.sparsify is None else "topk",
            "topk": None if job.sparsify is None else job.sparsify.ratio,
            "sparsify": None if job.sparsify is None else job.sparsify.to_dict(),
            "optimizer": job.optimizer.value,
            "steps": steps,
            "bytes_sent": stats.bytes_sent,
            "bytes_sent_per_rank": [int(b) for b, _, _ in per_rank],
            "bytes_dense": stats.bytes_dense,
            "compression_ratio": stats.bytes_dense / stats.bytes_sent if stats.bytes_sent else None,
            "history": history,
        }
    shared = [metrics]
    dist.broadcast_object_list(shared, src=0)
    metrics = shared[0]
    assert metrics is not None
    if rank == 0 and job.out is not None:
        data = {"source": job.source, "name": job.data_name, "val_units": list(p.val_units), "seed": cfg.seed}
        save_checkpoint(
            Path(job.out),
            net,
            model_config=job.model_config,
            window_spec=p.spec,
            graph=p.graph,
            data=data,
            metrics=metrics,
        )
    return metrics


def _make_optimizer(job: _Job, net: nn.Module) -> torch.optim.Optimizer:
    cfg = job.train_config
    if job.optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    in_hook = job.sparsify is not None and job.sparsify.momentum > 0
    return torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=0.0 if in_hook else job.momentum, weight_decay=cfg.weight_decay
    )
