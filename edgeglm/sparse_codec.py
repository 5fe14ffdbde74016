"""Wire codec for sparse model updates from edge nodes (numpy + zstandard; no torch).

An edge node that fine-tunes locally sends the cloud a Top-k sparse delta
(:mod:`edgeglm.compress.sparsify`) on ``edgeglm/v1/{node}/update``. The cloud
daemon decodes and aggregates it without torch.

Payload, version 1 (all integers little-endian)::

    header   magic "EGSU" | version u16 | flags u16 (0) | body size u32 | zstd size u32     16 bytes
    body     zstd( model update, below )                                                    zstd size
    trailer  CRC-32 (zlib) of header + compressed body, u32                                 4 bytes

    update   base_version: u16 length + UTF-8 | sample_count u64 | tensor count u32 | tensors
    tensor   name: u16 length + UTF-8 | ndim u8 | dims u64 × ndim | nnz u64
             | index encoding u8 | index bytes: u64 length + bytes
             | value format u8 | scale (FP16: exponent i16; INT8: f32) | values: nnz × (2 or 1) bytes

Indices (flat, row-major, strictly ascending) are stored as gaps
``d_0 = i_0, d_j = i_j − i_{j−1} − 1`` in unsigned LEB128 varints, or as a
bitmap of ``⌈numel / 8⌉`` bytes (bit ``i`` of byte ``i // 8``, least
significant first), whichever is smaller for that tensor (a bitmap wins above
roughly one entry in eight). Values travel as

- ``FP16``: IEEE half floats of ``v · 2^-e`` with the per-tensor exponent
  ``e = ⌊log2 max|v|⌋ − 14``, so the largest magnitude lands in ``[2^14, 2^15)``.
  Scaling by a power of two is exact, so small deltas (lr × gradient is often
  below fp16's smallest normal 6e-5) keep fp16's relative error ≤ 2^-11 down to
  ``max|v| · 2^-28`` (absolute error ≤ ``max|v| · 2^-39`` below that) instead of
  being flushed to zero, and nothing overflows.
- ``INT8``: ``q = round(v / s)`` with the per-tensor scale ``s = max|v| / 127``
  (absolute error ≤ s / 2).

:func:`decode` never returns a wrong tensor: a truncated, extended or
bit-flipped payload fails the length or CRC check, a payload of another codec
version is refused before anything else is read, and the body is parsed with
bounds checks (in-range, strictly ascending indices; exact byte counts).
Every failure is a :class:`~edgeglm.errors.CodecError`.

Aggregation (FedAvg, McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629)
weights each update's delta by its sample count ``n_i``; an entry a node did not
send counts as zero for that node::

    Δ = Σ_i n_i Δ_i / Σ_i n_i
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import numpy as np
import zstandard

from edgeglm.errors import CodecError

__all__ = [
    "CODEC_VERSION",
    "IndexEncoding",
    "SparseTensor",
    "SparseUpdate",
    "ValueFormat",
    "aggregate",
    "choose_index_encoding",
    "decode",
    "encode",
    "to_dense",
]

CODEC_VERSION = 1
MAGIC = b"EGSU"
MAX_BODY_BYTES = 1 << 30  # refuse to inflate more than 1 GiB (a corrupt or hostile size field)

_HEADER = struct.Struct("<4sHHII")
_TRAILER = struct.Struct("<I")
_MAX_NUMEL = 1 << 62


class ValueFormat(str, Enum):
    """How values travel: scaled half floats, or int8 with a per-tensor scale."""

    FP16 = "fp16"
    INT8 = "int8"


class IndexEncoding(str, Enum):
    """How a tensor's indices travel: LEB128 varint gaps, or a bitmap."""

    VARINT = "varint"
    BITMAP = "bitmap"


# Wire codes; 0 is never written.
_VALUE_CODES = {ValueFormat.FP16: 1, ValueFormat.INT8: 2}
_INDEX_CODES = {IndexEncoding.VARINT: 1, IndexEncoding.BITMAP: 2}


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """The sent entries of one tensor.

    Args:
        shape: the dense tensor's shape (``()`` for a scalar).
        indices: ``(nnz,)`` flat row-major indices, strictly ascending, in ``[0, numel)``;
            stored as a read-only int64 copy.
        values: ``(nnz,)`` finite values; stored as a read-only float32 copy.

    Raises:
        ValueError: the indices are not sorted, unique and in range, lengths differ,
            or a value is NaN or infinite.
    """

    shape: tuple[int, ...]
    indices: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape {shape} has a negative dimension")
        numel = math.prod(shape)
        if numel >= _MAX_NUMEL:
            raise ValueError(f"shape {shape} has {numel} elements, more than the codec's 2^62")
        idx = np.asarray(self.indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = np.array(idx, dtype=np.int64, copy=True).reshape(-1)
        val = np.array(self.values, dtype=np.float32, copy=True).reshape(-1)
        if idx.shape != val.shape:
            raise ValueError(f"{idx.size} indices but {val.size} values; pass one value per index")
        if idx.size:
            if idx[0] < 0 or idx[-1] >= numel:
                raise ValueError(f"indices must lie in [0, {numel}) for shape {shape}")
            if np.any(np.diff(idx) <= 0):
                raise ValueError("indices must be strictly ascending (sorted, no duplicates); sort them first")
            if not np.all(np.isfinite(val)):
                raise ValueError("values contain NaN or infinity; a diverged update must not be sent")
        idx.flags.writeable = False
        val.flags.writeable = False
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "values", val)

    @property
    def numel(self) -> int:
        """Elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Entries sent."""
        return int(self.indices.size)

    def to_dense(self) -> np.ndarray:
        """The dense float32 array of ``shape``, zero where nothing was sent."""
        dense = np.zeros(self.numel, dtype=np.float32)
        dense[self.indices] = self.values
        return dense.reshape(self.shape)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.values, other.values)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class SparseUpdate:
    """A sparse model delta from one node.

    Args:
        tensors: tensor name → sent entries, in the model's order (kept as a read-only mapping).
        sample_count: training samples behind the update, ≥ 1 (the aggregation weight).
        base_version: the model version this is a delta against.

    Raises:
        ValueError: a name or the version is too long, an entry is not a
            :class:`SparseTensor`, or ``sample_count`` is out of range.
    """

    tensors: Mapping[str, SparseTensor]
    sample_count: int
    base_version: str

    def __post_init__(self) -> None:
        tensors = dict(self.tensors)
        for name, t in tensors.items():
            if not isinstance(name, str) or len(name.encode()) > 0xFFFF:
                raise ValueError(f"tensor name {name!r} must be a str of at most 65535 UTF-8 bytes")
            if not isinstance(t, SparseTensor):
                raise ValueError(
                    f"tensor {name!r} is a {type(t).__name__}; wrap it as SparseTensor(shape, indices, values)"
                )
        count = self.sample_count
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count < 2**63:
            raise ValueError(f"sample_count {self.sample_count!r} must be an integer ≥ 1")
        if not isinstance(self.base_version, str) or len(self.base_version.encode()) > 0xFFFF:
            raise ValueError(f"base_version {self.base_version!r} must be a str of at most 65535 UTF-8 bytes")
        object.__setattr__(self, "tensors", MappingProxyType(tensors))
        object.__setattr__(self, "sample_count", int(self.sample_count))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseUpdate):
            return NotImplemented
        return (
            self.sample_count == other.sample_count
            and self.base_version == other.base_version
            and list(self.tensors) == list(other.tensors)
            and all(self.tensors[n] == other.tensors[n] for n in self.tensors)
        )

    __hash__ = None  # type: ignore[assignment]


# -- helpers for the cloud --------------------------------------------------------------------


def to_dense(update: SparseUpdate) -> dict[str, np.ndarray]:
    """Every tensor of ``update`` as a dense float32 array of its shape."""
    return {name: t.to_dense() for name, t in update.tensors.items()}


def aggregate(updates: Sequence[SparseUpdate]) -> dict[str, np.ndarray]:
    """Sample-weighted average of sparse deltas, ``Δ = Σ_i n_i Δ_i / Σ_i n_i`` (dense float32).

    A tensor missing from an update, or an entry not sent, counts as a zero delta for
    that update. Accumulates in float64.

    Raises:
        ValueError: no updates, updates against different base versions, or one
            tensor name with different shapes.
    """
    if not updates:
        raise ValueError("aggregate needs at least one update")
    bases = sorted({u.base_version for u in updates})
    if len(bases) > 1:
        raise ValueError(
            f"updates are deltas against different model versions {bases}; aggregate each version separately"
        )
    total = sum(u.sample_count for u in updates)
    acc: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for u in updates:
        weight = u.sample_count / total
        for name, t in u.tensors.items():
            if name not in acc:
                acc[name] = np.zeros(t.numel, dtype=np.float64)
                shapes[name] = t.shape
            elif shapes[name] != t.shape:
                raise ValueError(f"tensor {name!r} has shape {shapes[name]} in one update and {t.shape} in another")
            acc[name][t.indices] += weight * t.values.astype(np.float64)
    return {name: a.astype(np.float32).reshape(shapes[name]) for name, a in acc.items()}


def choose_index_encoding(indices: np.ndarray, numel: int) -> IndexEncoding:
    """The smaller of the varint-gap and bitmap encodings of ``indices`` (varint on a tie)."""
    varint_bytes = int(_varint_lengths(_gaps(np.asarray(indices, dtype=np.int64))).sum())
    return IndexEncoding.BITMAP if (numel + 7) // 8 < varint_bytes else IndexEncoding.VARINT


# -- encode -----------------------------------------------------------------------------------


def encode(update: SparseUpdate, values: ValueFormat = ValueFormat.FP16, *, zstd_level: int = 3) -> bytes:
    """Serialize ``update`` to a versioned, compressed, checksummed payload.

    Args:
        update: the sparse delta.
        values: how values travel (default: :attr:`ValueFormat.FP16`).
        zstd_level: zstandard compression level (default: 3).

    Returns:
        The payload (header, zstd body, CRC-32 trailer; see the module docstring).

    Raises:
        CodecError: the body exceeds 1 GiB.
    """
    values = ValueFormat(values)
    out = bytearray()
    _put_str(out, update.base_version)
    out += struct.pack("<QI", update.sample_count, len(update.tensors))
    for name, t in update.tensors.items():
        _put_str(out, name)
        out += struct.pack("<B", len(t.shape))
        out += struct.pack(f"<{len(t.shape)}Q", *t.shape)
        out += struct.pack("<Q", t.nnz)
        encoding = choose_index_encoding(t.indices, t.numel)
        if encoding is IndexEncoding.VARINT:
            index_bytes = _encode_varints(_gaps(t.indices))
        else:
            mask = np.zeros(t.numel, dtype=bool)
            mask[t.indices] = True
            index_bytes = np.packbits(mask, bitorder="little").tobytes()
        out += struct.pack("<BQ", _INDEX_CODES[encoding], len(index_bytes))
        out += index_bytes
        out += struct.pack("<B", _VALUE_CODES[values])
        peak = float(np.abs(t.values).max()) if t.nnz else 0.0
        if values is ValueFormat.FP16:
            exponent = math.frexp(peak)[1] - 15 if peak > 0 else 0
            out += struct.pack("<h", exponent)
            out += np.ldexp(t.values, -exponent).astype("<f2").tobytes()
        else:
            scale = np.float32(peak / 127.0)
            if scale > 0:
                q = np.clip(np.rint(t.values / scale), -127, 127).astype(np.int8)
            else:
                q = np.zeros(t.nnz, dtype=np.int8)
            out += struct.pack("<f", scale)
            out += q.tobytes()
    if len(out) > MAX_BODY_BYTES:
        raise CodecError(
            f"sparse update body is {len(out)} bytes, over the codec's limit of {MAX_BODY_BYTES}",
            hint="send fewer entries (a smaller Top-k ratio) or split the update by tensor",
        )
    body = zstandard.ZstdCompressor(level=zstd_level).compress(bytes(out))
    header = _HEADER.pack(MAGIC, CODEC_VERSION, 0, len(out), len(body))
    crc = zlib.crc32(body, zlib.crc32(header))
    return header + body + _TRAILER.pack(crc)


# -- decode -----------------------------------------------------------------------------------


def decode(payload: bytes | bytearray | memoryview) -> SparseUpdate:
    """Parse a payload written by :func:`encode`.

    Returns:
        The update; indices, shapes, names, sample count and base version are exact,
        values within the format's precision.

    Raises:
        CodecError: the payload is truncated or extended, corrupt (CRC, zstd or structure),
            or of another codec version. The message says which.
    """
    data = bytes(payload)
    if len(data) < _HEADER.size:
        raise CodecError(
            f"sparse update truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header",
            hint="the message was cut in transit; ask the node to resend",
        )
    magic, version, flags, body_size, zstd_size = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(
            f"not an EdgeGLM sparse update: magic {magic!r}, expected {MAGIC!r}",
            hint="check the topic: only edgeglm/v1/{node}/update carries sparse updates",
        )
    if version != CODEC_VERSION:
        raise CodecError(
            f"sparse update has codec version {version}; this EdgeGLM decodes version {CODEC_VERSION}",
            hint="run the same EdgeGLM release on the edge node and in the cloud (or the payload is corrupt)",
        )
    expected = _HEADER.size + zstd_size + _TRAILER.size
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CodecError(
            f"sparse update {what}: {len(data)} bytes, its header declares {expected}",
            hint="the message was cut or altered in transit; ask the node to resend",
        )
    (crc,) = _TRAILER.unpack_from(data, expected - _TRAILER.size)
    if zlib.crc32(data[: expected - _TRAILER.size]) != crc:
        raise CodecError(
            "sparse update is corrupt: CRC-32 mismatch", hint="the payload was altered in transit; ask for a resend"
        )
    if flags != 0:
        raise CodecError(
            f"sparse update sets unknown flags {flags:#06x}", hint="decode it with the EdgeGLM release that wrote it"
        )
    if body_size > MAX_BODY_BYTES:
        raise CodecError(f"sparse update declares a {body_size}-byte body, over the limit of {MAX_BODY_BYTES}")
    try:
        body = zstandard.ZstdDecompressor().decompress(
            data[_HEADER.size : expected - _TRAILER.size], max_output_size=body_size
        )
    except zstandard.ZstdError as exc:
        raise CodecError(f"sparse update body does not decompress: {exc}") from None
    if len(body) != body_size:
        raise CodecError(f"sparse update body is {len(body)} bytes, its header declares {body_size}")
    return _parse_body(body)


def _parse_body(body: bytes) -> SparseUpdate:
    r = _Reader(body)
    base_version = r.string("base version")
    sample_count, count = r.unpack("<QI", "update header")
    if sample_count < 1 or sample_count >= 2**63:
        raise CodecError(f"sparse update is corrupt: sample count {sample_count}")
    tensors: dict[str, SparseTensor] = {}
    for _ in range(count):
        name = r.string("tensor name")
        if name in tensors:
            raise CodecError(f"sparse update is corrupt: tensor {name!r} appears twice")
        (ndim,) = r.unpack("<B", f"tensor {name!r}")
        shape = r.unpack(f"<{ndim}Q", f"shape of {name!r}")
        numel = math.prod(shape)
        (nnz,) = r.unpack("<Q", f"tensor {name!r}")
        if numel >= _MAX_NUMEL or nnz > numel:
            raise CodecError(f"sparse update is corrupt: tensor {name!r} has shape {shape} and {nnz} entries")
        encoding_code, index_len = r.unpack("<BQ", f"indices of {name!r}")
        index_bytes = r.take(index_len, f"indices of {name!r}")
        if encoding_code == _INDEX_CODES[IndexEncoding.VARINT]:
            gaps = _decode_varints(index_bytes, name)
            if gaps.size != nnz:
                raise CodecError(f"sparse update is corrupt: tensor {name!r} has {gaps.size} indices, expected {nnz}")
            indices = _ungap(gaps, numel, name)
        elif encoding_code == _INDEX_CODES[IndexEncoding.BITMAP]:
            if len(index_bytes) != (numel + 7) // 8:
                raise CodecError(f"sparse update is corrupt: bitmap of {name!r} has {len(index_bytes)} bytes")
            bits = np.unpackbits(np.frombuffer(index_bytes, dtype=np.uint8), bitorder="little")
            if bits[numel:].any():
                raise CodecError(f"sparse update is corrupt: bitmap of {name!r} marks entries past {numel}")
            indices = np.flatnonzero(bits[:numel]).astype(np.int64)
            if indices.size != nnz:
                raise CodecError(f"sparse update is corrupt: bitmap of {name!r} marks {indices.size}, not {nnz}")
        else:
            raise CodecError(f"sparse update is corrupt: unknown index encoding {encoding_code} for {name!r}")
        (format_code,) = r.unpack("<B", f"values of {name!r}")
        if format_code == _VALUE_CODES[ValueFormat.FP16]:
            (exponent,) = r.unpack("<h", f"exponent of {name!r}")
            if not -200 <= exponent <= 200:
                raise CodecError(f"sparse update is corrupt: exponent {exponent} of {name!r}")
            half = np.frombuffer(r.take(2 * nnz, f"values of {name!r}"), dtype="<f2").astype(np.float32)
            values = np.ldexp(half, exponent).astype(np.float32)
        elif format_code == _VALUE_CODES[ValueFormat.INT8]:
            (scale,) = r.unpack("<f", f"scale of {name!r}")
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"sparse update is corrupt: scale {scale} of {name!r}")
            q = np.frombuffer(r.take(nnz, f"values of {name!r}"), dtype=np.int8)
            values = q.astype(np.float32) * np.float32(scale)
        else:
            raise CodecError(f"sparse update is corrupt: unknown value format {format_code} for {name!r}")
        if not np.all(np.isfinite(values)):
            raise CodecError(f"sparse update is corrupt: tensor {name!r} decodes to NaN or infinity")
        try:
            tensors[name] = SparseTensor(shape, indices, values)
        except ValueError as exc:  # the checks above should make this unreachable
            raise CodecError(f"sparse update is corrupt: tensor {name!r}: {exc}") from None
    if r.remaining:
        raise CodecError(f"sparse update is corrupt: {r.remaining} bytes after the last tensor")
    return SparseUpdate(tensors, sample_count=sample_count, base_version=base_version)


class _Reader:
    """Bounds-checked reads over the decompressed body; overruns are CodecErrors."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise CodecError(f"sparse update is corrupt: {what} needs {n} bytes, {self.remaining} left")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("<H", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"sparse update is corrupt: {what} is not UTF-8") from None


def _put_str(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    out += struct.pack("<H", len(b))
    out += b


# -- index gaps and LEB128 varints ------------------------------------------------------------


def _gaps(indices: np.ndarray) -> np.ndarray:
    """``d_0 = i_0, d_j = i_j − i_{j−1} − 1`` as uint64 (indices strictly ascending)."""
    if indices.size == 0:
        return np.zeros(0, dtype=np.uint64)
    gaps = np.empty(indices.size, dtype=np.int64)
    gaps[0] = indices[0]
    gaps[1:] = np.diff(indices) - 1
    return gaps.astype(np.uint64)


def _ungap(gaps: np.ndarray, numel: int, name: str) -> np.ndarray:
    """Invert :func:`_gaps`, checking every index lies in ``[0, numel)``."""
    if gaps.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(gaps.max()) >= numel:
        raise CodecError(f"sparse update is corrupt: indices of {name!r} run past {numel}")
    indices = np.cumsum(gaps + np.uint64(1), dtype=np.uint64) - np.uint64(1)
    if int(indices[-1]) >= numel or (indices.size > 1 and np.any(np.diff(indices) == 0)):
        raise CodecError(f"sparse update is corrupt: indices of {name!r} run past {numel}")
    return indices.astype(np.int64)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes of each unsigned LEB128 varint: ``max(1, ⌈bits / 7⌉)``."""
    lengths = np.ones(values.size, dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        lengths += rest > 0
        rest = rest >> np.uint64(7)
    return lengths


def _encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more follows."""
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max()) if values.size else 0):
        sel = lengths > j
        group = (values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def _decode_varints(data: bytes, name: str) -> np.ndarray:
    """Inverse of :func:`_encode_varints`; rejects cut, overlong and non-canonical varints."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    last = (b & 0x80) == 0
    if not last[-1]:
        raise CodecError(f"sparse update is corrupt: the indices of {name!r} end inside a varint")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10 or np.any(b[ends[lengths == 10]] > 1):
        raise CodecError(f"sparse update is corrupt: an index gap of {name!r} overflows 64 bits")
    if np.any(b[ends[lengths > 1]] == 0):
        raise CodecError(f"sparse update is corrupt: an index gap of {name!r} is not canonical")
    position = np.arange(b.size) - np.repeat(starts, lengths)
    groups = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    return np.bitwise_or.reduceat(groups, starts)
