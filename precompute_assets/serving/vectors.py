"""The Redis value format of one document embedding. Imports numpy and the standard library only.

Layout (all multi-byte fields little-endian), a 12-byte header followed by the payload::

    offset  size  type     field
    0       1     uint8    format version, currently 1
    1       1     uint8    dtype code: 1 = int8, 2 = float32
    2       2     uint16   dim, the number of payload values (1..65535)
    4       4     float32  scale: value i is payload[i] * scale (int8); 1.0 for float32 payloads
    8       4     uint32   model id: CRC-32 (zlib/IEEE 802.3, as in zlib.crc32) of the UTF-8 bytes of the
                           embedding model's version string; compare vectors only when their ids match
    12      dim   int8     payload, dtype code 1: signed bytes, two's complement, -127..127
    12      4*dim float32  payload, dtype code 2: IEEE 754 binary32

So a value is exactly ``12 + dim`` bytes (int8) or ``12 + 4 * dim`` bytes (float32); 312 bytes for a
300-dim int8 vector. int8 vectors are quantised per vector and symmetrically: ``scale = max|x| / 127`` and
``payload[i] = round(x[i] / scale)`` (half to even), so the dequantised vector is ``payload * scale``; an
all-zero vector has scale 0. Embeddings are stored L2-normalised before quantisation; after dequantising,
re-normalise if exact unit length matters (cosine ranking does not need it).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
HEADER = struct.Struct("<BBHfI")
HEADER_SIZE = HEADER.size  # 12
DTYPE_CODES = {"int8": 1, "float32": 2}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
PAYLOAD_TYPES = {"int8": np.dtype("<i1"), "float32": np.dtype("<f4")}
INT8_MAX = 127  # symmetric: -127..127, so -x quantises to -q
MAX_DIM = 0xFFFF


@dataclass(frozen=True)
class DecodedVector:
    vector: np.ndarray  # float32 (dim,), dequantised for int8 payloads
    dtype: str  # "int8" or "float32"
    dim: int
    scale: float
    model_id: int


def model_id(version: str) -> int:
    """The 32-bit id of an embedding model version, as stored in bytes 8-11 of every value."""
    return zlib.crc32(version.encode("utf-8")) & 0xFFFFFFFF


def _records(n: int, dim: int, dtype: str) -> np.ndarray:
    """An uninitialised array of ``n`` packed values: header fields then payload, no padding."""
    layout = np.dtype(
        [
            ("version", "u1"),
            ("dtype", "u1"),
            ("dim", "<u2"),
            ("scale", "<f4"),
            ("model", "<u4"),
            ("payload", PAYLOAD_TYPES[dtype], (dim,)),
        ]
    )
    return np.empty(n, dtype=layout)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``x ~= q * scale[:, None]``; returns ``(q int8 (n, d), scale float32 (n,))``.

    A zero row gets scale 0 and all-zero codes.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    scale = (np.abs(x).max(axis=1, initial=0.0) / INT8_MAX).astype(np.float32)
    scaled = np.divide(x, scale[:, None], out=np.zeros_like(x), where=scale[:, None] > 0)
    q = np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def encode_batch(vectors: np.ndarray, *, dtype: str = "int8", model_version: str) -> list[bytes]:
    """One value per row of ``vectors`` (n, dim), quantising all rows at once."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_CODES)}")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or not 1 <= x.shape[1] <= MAX_DIM:
        raise ValueError(f"expected (n, dim) vectors with 1 <= dim <= {MAX_DIM}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("vectors contain NaN or infinity")
    records = _records(len(x), x.shape[1], dtype)
    records["version"] = FORMAT_VERSION
    records["dtype"] = DTYPE_CODES[dtype]
    records["dim"] = x.shape[1]
    records["model"] = model_id(model_version)
    if dtype == "int8":
        records["payload"], records["scale"] = quantize_int8(x)
    else:
        records["payload"] = x
        records["scale"] = 1.0
    raw, size = records.tobytes(), records.dtype.itemsize
    return [raw[at : at + size] for at in range(0, len(raw), size)]


def encode_vector(vec: np.ndarray, *, dtype: str = "int8", model_version: str) -> bytes:
    """The value of one vector (dim,)."""
    x = np.asarray(vec, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected one vector (dim,), got shape {x.shape}")
    return encode_batch(x[None, :], dtype=dtype, model_version=model_version)[0]


def decode_vector(raw: bytes) -> DecodedVector:
    """Parse a value; ``ValueError`` if it is truncated, too long, or of an unknown version or dtype."""
    raw = bytes(raw)
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"embedding value is {len(raw)} bytes, shorter than its {HEADER_SIZE}-byte header")
    version, code, dim, scale, model = HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown embedding format version {version} (this reader knows {FORMAT_VERSION})")
    if code not in DTYPE_NAMES:
        raise ValueError(f"unknown embedding dtype code {code} (known: {DTYPE_NAMES})")
    dtype = DTYPE_NAMES[code]
    expected = HEADER_SIZE + dim * PAYLOAD_TYPES[dtype].itemsize
    if len(raw) != expected:
        raise ValueError(f"{dtype} embedding of dim {dim} must be {expected} bytes, got {len(raw)}")
    payload = np.frombuffer(raw, dtype=PAYLOAD_TYPES[dtype], offset=HEADER_SIZE, count=dim)
    vector = payload.astype(np.float32)  # a writable copy in native byte order
    if dtype == "int8":
        vector *= np.float32(scale)
    return DecodedVector(vector=vector, dtype=dtype, dim=dim, scale=float(scale), model_id=model)


def decode_batch(raws: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors float32 (n, dim), model ids uint32 (n,))`` of values that share one layout (dtype and dim), in
    one numpy pass; ``ValueError`` when they do not, or a value is malformed (``decode_vector`` names why)."""
    if not raws:
        return np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.uint32)
    first = decode_vector(raws[0])
    size = HEADER_SIZE + first.dim * PAYLOAD_TYPES[first.dtype].itemsize
    if any(len(raw) != size for raw in raws):
        bad = next(raw for raw in raws if len(raw) != size)
        decode_vector(bad)  # raises if malformed on its own
        raise ValueError(f"embeddings of different layouts: {len(bad)} bytes beside {size}")
    records = np.frombuffer(b"".join(raws), dtype=_records(0, first.dim, first.dtype).dtype)
    if (records["version"] != FORMAT_VERSION).any() or (records["dtype"] != DTYPE_CODES[first.dtype]).any():
        raise ValueError("embeddings of different format versions or dtypes in one batch")
    vectors = records["payload"].astype(np.float32)
    if first.dtype == "int8":
        vectors *= records["scale"][:, None]
    return vectors, records["model"].astype(np.uint32)
