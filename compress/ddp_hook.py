"""DDP communication hooks: Top-k sparse all-gather, and the dense all-reduce baseline.

Both hooks plug into ``DistributedDataParallel.register_comm_hook`` and count the
bytes each rank contributes, so a benchmark compares like with like::

    state = TopKHookState(SparsifyConfig(ratio=0.001, warmup_steps=4 * steps_per_epoch,
                                         warmup_stage_steps=steps_per_epoch))
    ddp.register_comm_hook(state, topk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.0)   # momentum lives in the hook
    ...
    state.stats.bytes_sent, state.stats.bytes_dense, state.stats.compression_ratio

Top-k hook, per bucket (DDP's flat gradient buffer ``g`` of ``n`` elements) and
iteration ``t`` on each of the ``N`` ranks (Lin et al., "Deep Gradient
Compression", ICLR 2018, https://arxiv.org/abs/1712.01887; the compressor's
equations are in :mod:`edgeglm.compress.sparsify`)::

    (I_r, V_r) = TopKCompressor_bucket.compress(g_r, t)       |I_r| ≤ k = k_at(t, n) on every rank
    P_r        = [I_r as int32, padded to k | V_r as float32 bits, padded to k]   (2k int32)
    [P_0 … P_{N−1}] = all_gather(P_r)                           one collective, fixed size
    ĝ          = (1/N) Σ_r scatter_add(I_r, V_r)                the dense averaged gradient

Padding entries are ``(index 0, value 0.0)`` and add nothing. Every rank derives
the same ``k`` from the schedule, so no counts are exchanged first.

Byte accounting (:class:`CommStats`): ``bytes_sent`` is the payload a rank hands
to its collectives (all-reduce: ``n · element size``; Top-k: ``8k``, 4 bytes of
index and 4 of value per entry); ``bytes_dense`` is what dense all-reduce would
have handed over for the same buckets. Wire traffic also depends on the
collective's algorithm (a ring all-reduce moves ``2(N−1)/N`` of its payload per
rank, a ring all-gather ``(N−1)`` times each rank's part), so both counts are
payloads and their ratio is DGC's compression ratio.

DDP rebuilds its buckets after the first iteration, so, as PyTorch's PowerSGD
hook does, the Top-k hook runs dense all-reduce for the first ``start_iter``
iterations (default 1); the warm-up schedule's step 0 is the first sparse
iteration. A compressor is tied to its bucket's parameters: if a bucket's
layout ever changes, its residual is dropped with a warning and a fresh
compressor starts.

Works with any backend that has all-reduce and all-gather of a single tensor:
gloo on CPU (tested) and NCCL on GPUs.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the hook's
# annotations with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects.
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from edgeglm.compress.sparsify import SparsifyConfig, TopKCompressor
from edgeglm.errors import ConfigError

__all__ = ["CommStats", "DenseHookState", "TopKHookState", "dense_allreduce_hook", "topk_hook"]

# torch ≥ 2.13 names the fixed-size all-gather ``all_gather_single`` and deprecates
# ``all_gather_into_tensor``; both take (output, input, group=..., async_op=...).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_INDEX_LIMIT = 2**31  # indices travel as int32


@dataclass
class CommStats:
    """Bytes one rank handed to its gradient collectives.

    Attributes:
        bytes_sent: payload this rank contributed (indices + values for Top-k).
        bytes_dense: payload dense all-reduce would have contributed for the same buckets.
        buckets: hook calls (one per bucket per iteration).
        iterations: completed iterations (counted on each iteration's last bucket).
    """

    bytes_sent: int = 0
    bytes_dense: int = 0
    buckets: int = 0
    iterations: int = 0

    @property
    def compression_ratio(self) -> float:
        """``bytes_dense / bytes_sent`` (1.0 for the dense hook; ``inf`` before anything was sent)."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else float("inf")

    def reset(self) -> None:
        """Zero every counter (e.g. between a warm-up and a measured run)."""
        self.bytes_sent = self.bytes_dense = self.buckets = self.iterations = 0


class DenseHookState:
    """State of :func:`dense_allreduce_hook`: the process group and the byte counts.

    Args:
        process_group: the group to average over (default: the world group).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.stats = CommStats()


class TopKHookState:
    """State of :func:`topk_hook`: one :class:`TopKCompressor` per DDP bucket, and byte counts.

    Args:
        config: the sparsification settings, shared by every bucket.
        process_group: the group to average over (default: the world group).
        start_iter: iterations of dense all-reduce before Top-k starts; DDP rebuilds
            its buckets after the first iteration, so keep it ≥ 1 (default: 1).
        seed: base seed of sampled selection; rank ``r`` uses ``seed + r`` (default: 0).
    """

    def __init__(
        self,
        config: SparsifyConfig,
        *,
        process_group: dist.ProcessGroup | None = None,
        start_iter: int = 1,
        seed: int = 0,
    ) -> None:
        if not isinstance(start_iter, int) or isinstance(start_iter, bool) or start_iter < 0:
            raise ConfigError(
                f"start_iter {start_iter!r} must be an integer ≥ 0",
                hint="keep the default 1: DDP rebuilds its buckets after the first iteration",
            )
        self.config = config
        self.process_group = process_group
        self.start_iter = start_iter
        self.seed = seed
        self.iteration = 0
        self.stats = CommStats()
        self.compressors: dict[int, TopKCompressor] = {}
        self._layouts: dict[int, tuple[int, ...]] = {}

    def compressor_for(self, bucket: dist.GradBucket, world_size: int, rank: int) -> TopKCompressor:
        """The bucket's compressor, created on first use and renewed if the bucket's layout changed."""
        index = bucket.index()
        layout = (bucket.buffer().numel(), *(id(p) for p in bucket.parameters()))
        known = self._layouts.get(index)
        if known != layout:
            if known is not None:
                warnings.warn(
                    f"DDP bucket {index} changed its parameters; its Top-k residual was dropped",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.compressors[index] = TopKCompressor(self.config, world_size=world_size, seed=self.seed + rank)
            self._layouts[index] = layout
        return self.compressors[index]


def dense_allreduce_hook(state: DenseHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average the bucket by all-reduce, as DDP does without a hook, counting the bytes.

    ``ĝ = (1/N) Σ_r g_r``; ``bytes_sent`` and ``bytes_dense`` both grow by ``n · element size``.
    """
    buffer = bucket.buffer()
    nbytes = buffer.numel() * buffer.element_size()
    state.stats.bytes_sent += nbytes
    state.stats.bytes_dense += nbytes
    _count_bucket(state.stats, bucket)
    return _allreduce_mean(state.process_group, buffer)


def topk_hook(state: TopKHookState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average the bucket's Top-k sparsified gradients over the ranks (see the module docstring).

    Returns a future holding the dense averaged gradient, written into the bucket's buffer.
    The optimizer must not add momentum of its own when ``config.momentum > 0``.

    Raises:
        ConfigError: a bucket holds 2^31 elements or more (indices travel as int32).
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    n = buffer.numel()
    state.stats.bytes_dense += n * buffer.element_size()
    iteration = state.iteration
    if bucket.is_last():
        state.iteration += 1
    _count_bucket(state.stats, bucket)

    if iteration < state.start_iter or n == 0:
        state.stats.bytes_sent += n * buffer.element_size()
        return _allreduce_mean(state.process_group, buffer)
    if n >= _INDEX_LIMIT:
        raise ConfigError(
            f"DDP bucket {bucket.index()} holds {n} elements; Top-k indices travel as int32",
            hint="pass a smaller bucket_cap_mb to DistributedDataParallel",
        )

    step = iteration - state.start_iter
    k = state.config.k_at(step, n)
    compressor = state.compressor_for(bucket, world_size, dist.get_rank(group))
    sent = compressor.compress(buffer, step)
    m = sent.indices.numel()

    packed = torch.zeros(2 * k, dtype=torch.int32, device=buffer.device)
    packed[:m] = sent.indices.to(torch.int32)
    packed[k : k + m] = sent.values.to(torch.float32).view(torch.int32)
    gathered = torch.empty(world_size * 2 * k, dtype=torch.int32, device=buffer.device)
    state.stats.bytes_sent += packed.numel() * packed.element_size()
    fut = _all_gather_single(gathered, packed, group=group, async_op=True).get_future()

    def decompress(_: torch.futures.Future) -> Tensor:
        parts = gathered.view(world_size, 2, k)
        indices = parts[:, 0, :].reshape(-1).to(torch.int64)
        values = parts[:, 1, :].contiguous().view(torch.float32).reshape(-1)
        buffer.zero_()
        buffer.index_add_(0, indices, values.to(buffer.dtype))
        return buffer.div_(world_size)

    return fut.then(decompress)


def _allreduce_mean(process_group: dist.ProcessGroup | None, tensor: Tensor) -> torch.futures.Future[Tensor]:
    group = process_group if process_group is not None else dist.group.WORLD
    tensor.div_(dist.get_world_size(group))
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _count_bucket(stats: CommStats, bucket: dist.GradBucket) -> None:
    stats.buckets += 1
    if bucket.is_last():
        stats.iterations += 1
