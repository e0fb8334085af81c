"""The Redis key schema and value codecs: the one contract between the publisher and every reader.

Schema version 1 (all keys start with ``{namespace}:1:``, namespace ``pc`` by default):

=====================================  ========  ==========================================================
key                                    type      content
=====================================  ========  ==========================================================
``pc:1:{kind}:current``                string    ``{version}:{buckets}``: the published version and its
                                                 bucket count. Flipping this one key publishes a version.
``pc:1:{kind}:{version}:{bucket}``     hash      field = prediction key, value = encoded prediction.
                                                 ``bucket = crc32(utf8(key)) % buckets``. Each bucket has
                                                 a TTL; a whole version expires together.
``pc:1:{kind}:experiment``             string    JSON ``{"name", "salt", "arms": [A, B]}``: the A/B experiment the
                                                 current version of ``kind`` serves (absent: none). Set or
                                                 deleted in the same MULTI/EXEC as the pointer flip; a key's
                                                 arm is ``arm_of(salt, key, arms)``.
``pc:1:{kind}:live:{key}``             string    a value computed live by a read-through miss, with a TTL.
``pc:1:qlog``                          stream    one entry per prediction query (see ``querylog``).
``pc:1:qlog:trimmed_before``           string    ms: entries older than this were trimmed by the cleanup.
``pc:1:stats:{kind}``                  hash      ``hit`` / ``miss`` counters.
``pc:1:{kind}:seen:{key}``             string    ``1``: admission ``second_miss`` saw a live-tier lookup of the
                                                 key; TTL = the window.
``pc:1:{kind}:sketch``                 string    admission ``frequency``: a u32 request count, then a count-min
                                                 sketch of 4-bit counters (``serving.admission``).
=====================================  ========  ==========================================================

Values are encoded per kind (``CODECS``): ``ctr`` and ``campaign`` are 4-byte little-endian float32;
``doc_embedding`` is the vector layout of ``serving.vectors``; anything else is UTF-8 JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

SCHEMA_VERSION = 1
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ARM_PATTERN = KIND_PATTERN  # an experiment arm is named like a kind (the strategy it selects by: ``lstm``)
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Codec(Protocol):
    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, raw: bytes) -> Any: ...


class Float32Codec:
    """A probability or score as 4 little-endian bytes."""

    name = "f32"
    _struct = struct.Struct("<f")

    def encode(self, value: Any) -> bytes:
        return self._struct.pack(float(value))

    def decode(self, raw: bytes) -> float:
        return self._struct.unpack(raw)[0]


class JsonCodec:
    """Any JSON-serialisable value as compact UTF-8 JSON."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def decode(self, raw: bytes) -> Any:
        return json.loads(raw)


class VectorCodec:
    """An embedding in the binary layout of ``serving.vectors`` (12-byte header + int8/float32 payload).

    ``encode`` takes bytes already encoded by ``vectors.encode_batch`` (quantisation happens in batches);
    ``decode`` returns the dequantised float32 vector.
    """

    name = "vec"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError("encode embeddings with serving.vectors.encode_batch, then publish the bytes")
        return bytes(value)

    def decode(self, raw: bytes) -> Any:
        from .vectors import decode_vector

        return decode_vector(raw).vector


EMBEDDING_KIND = "doc_embedding"
CODECS: dict[str, Codec] = {"ctr": Float32Codec(), "campaign": Float32Codec(), EMBEDDING_KIND: VectorCodec()}
DEFAULT_CODEC: Codec = JsonCodec()


def codec_for(kind: str) -> Codec:
    """The codec that encodes values of ``kind``."""
    return CODECS.get(kind, DEFAULT_CODEC)


def bucket_of(key: str, buckets: int) -> int:
    """The hash bucket of ``key`` in a version with ``buckets`` buckets (crc32, portable to any language)."""
    return zlib.crc32(key.encode()) % buckets


def bucket_ids(fields: Sequence[bytes], buckets: int) -> np.ndarray:
    """``bucket_of`` for many keys at once, given as their UTF-8 bytes: int64 (len(fields),)."""
    return np.fromiter(map(zlib.crc32, fields), dtype=np.int64, count=len(fields)) % buckets


@dataclass(frozen=True)
class Pointer:
    """What ``{kind}:current`` holds: the published version and how its keys are bucketed."""

    version: str
    buckets: int

    def encode(self) -> bytes:
        return f"{self.version}:{self.buckets}".encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Pointer:
        text = raw.decode() if isinstance(raw, bytes) else raw
        version, _, buckets = text.rpartition(":")
        return cls(version, int(buckets))


@dataclass(frozen=True)
class KeySchema:
    """Builds every Redis key the project uses; ``namespace`` separates deployments sharing a server."""

    namespace: str = "pc"

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{SCHEMA_VERSION}"

    def pointer(self, kind: str) -> str:
        return f"{self.prefix}:{check_kind(kind)}:current"

    def bucket(self, kind: str, version: str, bucket: int | str) -> str:
        return f"{self.prefix}:{kind}:{version}:{bucket}"

    def bucket_for_key(self, kind: str, pointer: Pointer, key: str) -> str:
        return self.bucket(kind, pointer.version, bucket_of(key, pointer.buckets))

    def experiment(self, kind: str) -> str:
        """The A/B experiment served with the current version of ``kind`` (JSON, see ``Experiment``)."""
        return f"{self.prefix}:{check_kind(kind)}:experiment"

    def live(self, kind: str, key: str) -> str:
        return f"{self.prefix}:{kind}:live:{key}"

    def query_log(self) -> str:
        return f"{self.prefix}:qlog"

    def query_log_trimmed(self) -> str:
        """Stream IDs (ms) below this were trimmed by the cleanup job: those hours cannot be re-read."""
        return f"{self.prefix}:qlog:trimmed_before"

    def stats(self, kind: str) -> str:
        return f"{self.prefix}:stats:{kind}"

    def admission_seen(self, kind: str, key: str) -> str:
        """Marker of a recent live-tier lookup of ``key`` (admission ``second_miss``), with the window as TTL."""
        return f"{self.prefix}:{kind}:seen:{key}"

    def admission_sketch(self, kind: str) -> str:
        """The count-min sketch of live-tier lookups of ``kind`` (admission ``frequency``)."""
        return f"{self.prefix}:{kind}:sketch"


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a valid kind name, else raise ``ValueError``."""
    if not KIND_PATTERN.fullmatch(kind):
        raise ValueError(f"invalid kind {kind!r}: expected lower-case letters, digits and '_' (max 64)")
    return kind


def check_version(version: str) -> str:
    """Return ``version`` if it is a valid version id (no ':' so pointers stay parseable)."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"invalid version {version!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return version


# --- A/B experiments ------------------------------------------------------------------------------------


def arm_index(salt: str, key: str, n_arms: int) -> int:
    """The arm number (0..n_arms-1) of ``key``: the first 8 bytes of SHA-256 of ``utf8(salt + ":" + key)`` as a
    big-endian unsigned integer, modulo ``n_arms``. Portable to any language; a new salt reshuffles every key
    (unlike crc32, whose salted values differ by a constant for keys of equal length)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_arms


def arm_of(salt: str, key: str, arms: Sequence[str]) -> str:
    """The arm of ``key`` in an experiment salted with ``salt`` over ``arms`` (see ``arm_index``)."""
    return arms[arm_index(salt, key, len(arms))]


@dataclass(frozen=True)
class Experiment:
    """An A/B experiment between two arms (selection strategies): each key belongs to ``arm_of(salt, key, arms)``."""

    name: str
    salt: str
    arms: tuple[str, str]

    def __post_init__(self) -> None:
        arms = tuple(self.arms)
        object.__setattr__(self, "arms", arms)
        if (
            len(arms) != 2
            or len(set(arms)) != 2
            or not all(isinstance(a, str) and ARM_PATTERN.fullmatch(a) for a in arms)
        ):
            raise ValueError(f"an experiment needs two distinct arm names like 'frequency', got {list(arms)!r}")
        if not isinstance(self.salt, str) or not self.salt or len(self.salt) > 256:
            raise ValueError(f"an experiment needs a non-empty salt (at most 256 characters), got {self.salt!r}")
        if not isinstance(self.name, str) or len(self.name) > 256:
            raise ValueError(f"an experiment name is a string of at most 256 characters, got {self.name!r}")

    def arm(self, key: str) -> str:
        """The arm of ``key``."""
        return arm_of(self.salt, key, self.arms)

    def encode(self) -> bytes:
        return json.dumps(
            {"name": self.name, "salt": self.salt, "arms": list(self.arms)}, separators=(",", ":")
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> Experiment:
        """Parse ``encode``'s JSON; ``ValueError`` when it is malformed."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"experiment is not JSON: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("arms"), list):
            raise ValueError("experiment must be a JSON object with name, salt and arms")
        return cls(data.get("name", ""), data.get("salt"), tuple(data["arms"]))
