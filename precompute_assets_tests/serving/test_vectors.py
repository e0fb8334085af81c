"""The Redis value codec for embeddings: exact byte layout, round trips and refusals."""

from __future__ import annotations

import ast
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from precompute_assets.ml.quantize import dequantize
from precompute_assets.serving import vectors
from precompute_assets.serving.vectors import decode_vector, encode_batch, encode_vector, model_id, quantize_int8

VERSION = "hsvd300-0123456789abcdef"


@pytest.fixture
def unit_vectors() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(20, 300)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_int8_layout_byte_by_byte(unit_vectors: np.ndarray) -> None:
    raw = encode_vector(unit_vectors[0], model_version=VERSION)
    assert len(raw) == 312
    version, code, dim, scale, model = struct.unpack("<BBHfI", raw[:12])
    assert (version, code, dim, model) == (1, 1, 300, zlib.crc32(VERSION.encode()))
    assert scale == pytest.approx(np.abs(unit_vectors[0]).max() / 127, rel=1e-6)
    payload = np.frombuffer(raw[12:], dtype=np.int8)
    q, _ = quantize_int8(unit_vectors[:1])
    np.testing.assert_array_equal(payload, q[0])


def test_float32_layout_byte_by_byte(unit_vectors: np.ndarray) -> None:
    raw = encode_vector(unit_vectors[0], dtype="float32", model_version=VERSION)
    assert len(raw) == 12 + 4 * 300
    assert struct.unpack("<BBHfI", raw[:12]) == (1, 2, 300, 1.0, model_id(VERSION))
    np.testing.assert_array_equal(np.frombuffer(raw[12:], dtype="<f4"), unit_vectors[0])


def test_round_trips_match_the_quantiser(unit_vectors: np.ndarray) -> None:
    q, scale = quantize_int8(unit_vectors)
    expected = dequantize(q, scale)
    for i, raw in enumerate(encode_batch(unit_vectors, model_version=VERSION)):
        decoded = decode_vector(raw)
        assert (decoded.dtype, decoded.dim, decoded.model_id) == ("int8", 300, model_id(VERSION))
        assert decoded.vector.dtype == np.float32
        np.testing.assert_array_equal(decoded.vector, expected[i])
        assert decoded.scale == pytest.approx(float(scale[i]))
    exact = decode_vector(encode_vector(unit_vectors[3], dtype="float32", model_version=VERSION))
    np.testing.assert_array_equal(exact.vector, unit_vectors[3])
    assert exact.scale == 1.0


def test_batch_equals_one_by_one(unit_vectors: np.ndarray) -> None:
    for dtype in ("int8", "float32"):
        batch = encode_batch(unit_vectors, dtype=dtype, model_version=VERSION)
        assert batch == [encode_vector(v, dtype=dtype, model_version=VERSION) for v in unit_vectors]
    assert encode_batch(unit_vectors[:0], model_version=VERSION) == []


def test_zero_vector_round_trips() -> None:
    decoded = decode_vector(encode_vector(np.zeros(8, dtype=np.float32), model_version=VERSION))
    assert decoded.scale == 0.0 and not decoded.vector.any()


def test_model_id_is_crc32_of_the_version() -> None:
    assert model_id("st:some-model:384") == zlib.crc32(b"st:some-model:384")
    assert model_id("a") != model_id("b")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x01", "shorter than its 12-byte header"),
        (struct.pack("<BBHfI", 2, 1, 4, 1.0, 0) + bytes(4), "unknown embedding format version 2"),
        (struct.pack("<BBHfI", 1, 9, 4, 1.0, 0) + bytes(4), "unknown embedding dtype code 9"),
        (struct.pack("<BBHfI", 1, 1, 4, 1.0, 0) + bytes(3), "must be 16 bytes, got 15"),
        (struct.pack("<BBHfI", 1, 1, 4, 1.0, 0) + bytes(5), "must be 16 bytes, got 17"),
        (struct.pack("<BBHfI", 1, 2, 4, 1.0, 0) + bytes(4), "float32 embedding of dim 4 must be 28 bytes"),
    ],
)
def test_decode_refuses_malformed_values(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_vector(raw)


def test_encode_refuses_bad_input(unit_vectors: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        encode_vector(unit_vectors[0], dtype="float16", model_version=VERSION)
    with pytest.raises(ValueError, match="one vector"):
        encode_vector(unit_vectors, model_version=VERSION)
    with pytest.raises(ValueError, match="dim"):
        encode_batch(np.zeros((1, 70_000), dtype=np.float32), model_version=VERSION)
    with pytest.raises(ValueError, match="NaN"):
        encode_vector(np.array([0.5, np.nan], dtype=np.float32), model_version=VERSION)


def test_module_imports_only_numpy_and_the_standard_library() -> None:
    tree = ast.parse(Path(vectors.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
        for alias in node.names
    }
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == {"numpy"}


def test_layout_is_documented_in_the_module_docstring() -> None:
    doc = vectors.__doc__ or ""
    for needle in ("little-endian", "uint16", "float32", "uint32", "CRC-32", "int8", "312 bytes"):
        assert needle in doc
