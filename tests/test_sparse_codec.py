"""The sparse-update wire codec: exact round trips, value precision, and refusal of damaged payloads."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeglm.errors import CodecError
from edgeglm.sparse_codec import (
    CODEC_VERSION,
    IndexEncoding,
    SparseTensor,
    SparseUpdate,
    ValueFormat,
    aggregate,
    choose_index_encoding,
    decode,
    encode,
    to_dense,
)


def _random_tensor(rng: np.random.Generator, shape: tuple[int, ...], density: float, scale: float = 1.0):
    numel = int(np.prod(shape))
    nnz = max(1, round(density * numel))
    idx = np.sort(rng.choice(numel, nnz, replace=False))
    return SparseTensor(shape, idx, (rng.standard_normal(nnz) * scale).astype(np.float32))


@pytest.fixture
def update() -> SparseUpdate:
    rng = np.random.default_rng(0)
    return SparseUpdate(
        {
            "gconv.weight": _random_tensor(rng, (64, 32), 0.01, scale=1e-6),  # varint, tiny deltas
            "gconv.bias": _random_tensor(rng, (32,), 0.5),  # bitmap
            "head.scale": SparseTensor((), [0], [2.5]),
            "unused": SparseTensor((0, 4), [], []),
        },
        sample_count=1234,
        base_version="rul-gnn 3.1.0",
    )


def _small_payload() -> bytes:
    u = SparseUpdate(
        {"w": SparseTensor((4, 5), [1, 7, 19], [0.5, -1.25, 3.0]), "b": SparseTensor((3,), [0, 2], [1.0, -1.0])},
        sample_count=3,
        base_version="v1",
    )
    return encode(u)


def _with_crc(header_and_body: bytes) -> bytes:
    return header_and_body + struct.pack("<I", zlib.crc32(header_and_body))


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(ValueFormat))
def test_round_trip_is_exact_for_structure(update: SparseUpdate, fmt: ValueFormat) -> None:
    got = decode(encode(update, fmt))
    assert list(got.tensors) == list(update.tensors)
    assert got.sample_count == update.sample_count
    assert got.base_version == update.base_version
    for name, t in update.tensors.items():
        assert got.tensors[name].shape == t.shape
        assert got.tensors[name].indices.dtype == np.int64
        np.testing.assert_array_equal(got.tensors[name].indices, t.indices)
        assert got.tensors[name].values.dtype == np.float32


def test_fp16_keeps_relative_precision_even_for_tiny_deltas(update: SparseUpdate) -> None:
    got = decode(encode(update, ValueFormat.FP16))
    for name, t in update.tensors.items():
        err = np.abs(got.tensors[name].values - t.values)
        assert np.all(err <= 2.0**-11 * np.abs(t.values)), name
    # plain fp16 would flush 1e-6-scale deltas towards subnormals; the scaled format does not
    assert np.all(got.tensors["gconv.weight"].values != 0)


def test_int8_error_is_at_most_half_a_step(update: SparseUpdate) -> None:
    got = decode(encode(update, ValueFormat.INT8))
    for name, t in update.tensors.items():
        if t.nnz == 0:
            continue
        step = np.abs(t.values).max() / 127.0
        err = np.abs(got.tensors[name].values - t.values)
        assert np.all(err <= step / 2 * (1 + 1e-5)), name
        assert np.abs(got.tensors[name].values).max() == pytest.approx(np.abs(t.values).max(), rel=1e-6)


def test_values_exact_in_fp16_round_trip_to_an_equal_update() -> None:
    u = SparseUpdate({"w": SparseTensor((2, 3), [0, 4, 5], [0.5, -2.0, 1024.0])}, sample_count=1, base_version="")
    assert decode(encode(u)) == u


def test_empty_update_round_trips() -> None:
    u = SparseUpdate({}, sample_count=1, base_version="0")
    assert decode(encode(u, ValueFormat.INT8)) == u


def test_index_encoding_is_the_smaller_one() -> None:
    numel = 10_000
    sparse = np.arange(0, numel, 1000)  # 10 entries: ~20 varint bytes vs 1250 bitmap bytes
    dense = np.arange(0, numel, 3)  # 1 in 3: one varint byte each vs 1 bit each
    assert choose_index_encoding(sparse, numel) is IndexEncoding.VARINT
    assert choose_index_encoding(dense, numel) is IndexEncoding.BITMAP
    # every entry one byte as varint (gaps < 128) against numel/8 bytes as bitmap: 1 in 8 is the tie
    assert choose_index_encoding(np.arange(0, 800, 8), 800) is IndexEncoding.VARINT
    assert choose_index_encoding(np.arange(0, 800, 7), 800) is IndexEncoding.BITMAP
    for idx in (sparse, dense):
        u = SparseUpdate({"t": SparseTensor((numel,), idx, np.ones(idx.size))}, sample_count=1, base_version="v")
        assert decode(encode(u)) == u


def test_bitmap_makes_dense_ish_payload_smaller_than_its_varint_body() -> None:
    numel = 4096
    idx = np.arange(0, numel, 2)
    u = SparseUpdate({"t": SparseTensor((numel,), idx, np.zeros(idx.size))}, sample_count=1, base_version="v")
    payload = encode(u, zstd_level=1)
    body = zstandard.ZstdDecompressor().decompress(payload[16:-4])
    # header of the tensor + 512 bitmap bytes + 2 bytes per value; varint would need 2048 index bytes
    assert len(body) < 600 + 2 * idx.size


# -- damaged payloads --------------------------------------------------------------------------


def test_truncation_at_every_byte_boundary_raises() -> None:
    payload = _small_payload()
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut])


def test_trailing_bytes_raise() -> None:
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(_small_payload() + b"\x00")


def test_every_single_bit_flip_raises() -> None:
    payload = bytearray(_small_payload())
    for bit in range(8 * len(payload)):
        damaged = bytearray(payload)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError):
            decode(bytes(damaged))


def test_random_multi_bit_flips_raise() -> None:
    rng = np.random.default_rng(1)
    payload = np.frombuffer(_small_payload(), dtype=np.uint8)
    for _ in range(500):
        damaged = payload.copy()
        for pos in rng.choice(payload.size, size=rng.integers(2, 9), replace=False):
            damaged[pos] ^= np.uint8(1 << int(rng.integers(8)))
        with pytest.raises(CodecError):
            decode(damaged.tobytes())


def test_version_mismatch_names_both_versions() -> None:
    payload = _small_payload()
    future = bytearray(payload[:-4])
    struct.pack_into("<H", future, 4, CODEC_VERSION + 1)
    with pytest.raises(CodecError, match=rf"codec version {CODEC_VERSION + 1}.*decodes version {CODEC_VERSION}"):
        decode(_with_crc(bytes(future)))


def test_foreign_payload_is_refused_by_magic() -> None:
    with pytest.raises(CodecError, match="not an EdgeGLM sparse update"):
        decode(b'{"telemetry": 1}' + bytes(16))


def _reframe(body: bytes) -> bytes:
    """A well-formed frame (valid header and CRC) around an arbitrary body."""
    compressed = zstandard.ZstdCompressor().compress(body)
    return _with_crc(struct.pack("<4sHHII", b"EGSU", CODEC_VERSION, 0, len(body), len(compressed)) + compressed)


def test_structurally_bad_body_with_valid_crc_raises_codec_error() -> None:
    good = zstandard.ZstdDecompressor().decompress(_small_payload()[16:-4])
    for cut in range(len(good)):
        with pytest.raises(CodecError):
            decode(_reframe(good[:cut]))
    with pytest.raises(CodecError, match="after the last tensor"):
        decode(_reframe(good + b"\x00"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_body_with_valid_crc_never_leaks_another_exception(data: st.DataObject) -> None:
    body = bytearray(zstandard.ZstdDecompressor().decompress(_small_payload()[16:-4]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    try:
        got = decode(_reframe(bytes(body)))
    except CodecError:
        return
    for t in got.tensors.values():  # if it parses, it is a valid update
        assert np.all(np.diff(t.indices) > 0) and (t.nnz == 0 or t.indices[-1] < t.numel)


# -- property test -----------------------------------------------------------------------------


@st.composite
def sparse_updates(draw: st.DrawFn) -> SparseUpdate:
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=4, unique=True))
    tensors = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
        numel = int(np.prod(shape))
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=numel))) if numel else []
        values = draw(
            st.lists(
                st.floats(-1e4, 1e4, allow_nan=False, width=32),
                min_size=len(idx),
                max_size=len(idx),
            )
        )
        tensors[name] = SparseTensor(shape, np.asarray(idx, dtype=np.int64), np.asarray(values, np.float32))
    return SparseUpdate(
        tensors,
        sample_count=draw(st.integers(1, 2**40)),
        base_version=draw(st.text(max_size=20)),
    )


@settings(max_examples=150, deadline=None)
@given(sparse_updates(), st.sampled_from(list(ValueFormat)))
def test_round_trip_property(u: SparseUpdate, fmt: ValueFormat) -> None:
    got = decode(encode(u, fmt))
    assert (got.sample_count, got.base_version, list(got.tensors)) == (
        u.sample_count,
        u.base_version,
        list(u.tensors),
    )
    for name, t in u.tensors.items():
        g = got.tensors[name]
        assert g.shape == t.shape
        np.testing.assert_array_equal(g.indices, t.indices)
        if t.nnz:
            peak = float(np.abs(t.values).max())
            if fmt is ValueFormat.FP16:
                tol = 2.0**-11 * np.abs(t.values) + peak * 2.0**-39
            else:
                tol = peak / 127 / 2 * (1 + 1e-5)
            assert np.all(np.abs(g.values - t.values) <= tol)


# -- entries, dense views, aggregation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        ([3, 1], [1.0, 2.0], "ascending"),
        ([1, 1], [1.0, 2.0], "ascending"),
        ([0, 20], [1.0, 2.0], r"\[0, 20\)"),
        ([-1], [1.0], r"\[0, 20\)"),
        ([0, 1], [1.0], "one value per index"),
        ([0, 1], [1.0, float("nan")], "NaN"),
        ([0.5], [1.0], "integers"),
    ],
)
def test_sparse_tensor_rejects_bad_entries(indices: list, values: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseTensor((4, 5), np.asarray(indices), np.asarray(values))


def test_sparse_tensor_is_read_only() -> None:
    t = SparseTensor((3,), [0, 2], [1.0, 2.0])
    with pytest.raises(ValueError):
        t.values[0] = 5.0


def test_update_rejects_raw_tuples_and_zero_samples() -> None:
    with pytest.raises(ValueError, match="wrap it as SparseTensor"):
        SparseUpdate({"w": ((3,), [0], [1.0])}, sample_count=1, base_version="v")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="sample_count"):
        SparseUpdate({}, sample_count=0, base_version="v")


def test_to_dense() -> None:
    u = SparseUpdate({"w": SparseTensor((2, 3), [1, 5], [4.0, -1.0])}, sample_count=1, base_version="v")
    np.testing.assert_array_equal(to_dense(u)["w"], np.array([[0, 4, 0], [0, 0, -1]], np.float32))


def test_aggregate_weights_by_sample_count_and_treats_missing_as_zero() -> None:
    a = SparseUpdate(
        {"w": SparseTensor((4,), [0, 1], [1.0, 2.0]), "b": SparseTensor((2,), [1], [8.0])},
        sample_count=3,
        base_version="v7",
    )
    b = SparseUpdate({"w": SparseTensor((4,), [1, 3], [6.0, 4.0])}, sample_count=1, base_version="v7")
    got = aggregate([a, b])
    np.testing.assert_allclose(got["w"], [0.75, 3.0, 0.0, 1.0])
    np.testing.assert_allclose(got["b"], [0.0, 6.0])
    assert got["w"].dtype == np.float32


def test_aggregate_refuses_mixed_bases_and_shapes() -> None:
    a = SparseUpdate({"w": SparseTensor((4,), [0], [1.0])}, sample_count=1, base_version="v1")
    with pytest.raises(ValueError, match="different model versions"):
        aggregate([a, SparseUpdate({}, sample_count=1, base_version="v2")])
    c = SparseUpdate({"w": SparseTensor((2, 2), [0], [1.0])}, sample_count=1, base_version="v1")
    with pytest.raises(ValueError, match="shape"):
        aggregate([a, c])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])


def test_codec_does_not_import_torch() -> None:
    code = "import sys, edgeglm.sparse_codec; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
