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
``pc:1:{kind}:previous``               string    the pointer the last flip replaced, with the TTL of its
                                                 buckets' grace: what ``cache stats`` reports besides current.
``pc:1:{kind}:experiment``             string    JSON ``{"name", "salt", "arms": [A, B], "version"}``: the A/B
                                                 experiment the current version of ``kind`` serves (absent:
                                                 none), and that version. Set or deleted in the same MULTI/EXEC
                                                 as the pointer flip; a key's arm is ``arm_of(salt, key, arms)``;
                                                 a reader that read a pointer of another version takes none.
``pc:1:{kind}:live:{key}``             string    a value computed live by a read-through miss, with a TTL.
``pc:1:{kind}:invalidated:{version}``  set       what invalidations took out of a version (``k:{key}``,
                                                 ``p:{prefix}``, ``b:{bucket}`` it emptied): never written
                                                 back by a restore, never counted lost.
``pc:1:{kind}:epoch``                  string    a counter that every invalidation of ``kind``'s keys increments
                                                 before it deletes them: a read-through value computed
                                                 before it is not stored after it.
``pc:1:qlog``                          stream    one entry per prediction query (see ``querylog``).
``pc:1:events``                        stream    one entry per user event (see ``events``).
``pc:1:events:user:{digest}``          hash      a user's session state after the events the sensor has read
                                                 (``ml.next_action.UserState``), TTL two days; ``digest`` is
                                                 the BLAKE2b-128 hex of the user's UTF-8 id.
``pc:1:events:user_states_span``       string    ``{since} {through} {server}``: the sensor stored every event's
                                                 user's state between those stream IDs without a gap, on servers
                                                 that lost no key (``server``: ``events.server_mark``).
``pc:1:qlog:trimmed_before``           string    ms: entries older than this were trimmed by the cleanup.
``pc:1:stats:{kind}``                  hash      ``hit`` / ``miss`` counters.
``pc:1:{kind}:seen:{key}``             string    ``1``: admission ``second_miss`` saw a live-tier lookup of the
                                                 key; TTL = the window.
``pc:1:{kind}:sketch``                 string    admission ``frequency``: a u32 request count, then a count-min
                                                 sketch of 4-bit counters, then a u32 aging cursor
                                                 (``serving.admission``); ``:sketch:{width}x{depth}`` for a
                                                 sketch of another shape than the default.
``pc:1:{kind}:fifo:{pc:1:{kind}}:*``   various   admission ``probation``: ``small`` list, ``hits`` hash, ``main``
                                                 and ``ghost`` sorted sets, ``seq`` counter, ``published`` (the
                                                 current version's key count); one hash tag.
=====================================  ========  ==========================================================

Redis Cluster (``?cluster=1``, see ``connection``): the names carry no hash tag, so every key hashes whole and the
buckets of a version spread over all slots and masters (a publish spreads its write load; a ``get_many`` is one
round trip per master, in parallel). Readers resolve the pointer once, then read buckets of exactly that version:
the version is in every bucket's name, so a batch never mixes versions, on a cluster as on one server. The pointer
and the experiment are two slots, so the flip writes the experiment first and the pointer second, and readers read
the pointer first and the experiment second (``publish.flip_pointer``); campaign live values are one MULTI/EXEC per
slot (``publish.transact_per_slot``). A master that is down makes its slots' keys misses for readers, never errors.

Names that could reach into another kind's keys are refused with ``ValueError``: a namespace, kind or version
outside its pattern (no ``:``, no ``{``/``}`` hash-tag braces, no control characters), a kind named like one of
the shared keys (``qlog``, ``stats``), a version named like one of a kind's own keys (``live``, ``current``,
``experiment``, ``sketch``, ``seen``, ``fifo``...: version ``live`` would put bucket 0 at ``{kind}:live:0``, the live
value of key ``0``), and a prediction key (``check_key``) that is empty, longer than ``MAX_KEY_LENGTH`` characters, or
holds a control character, a lone surrogate or a brace (in ``{kind}:live:{key}`` braces would pick the key's
Redis Cluster slot).

Values are encoded per kind (``CODECS``): ``ctr`` and ``campaign`` are 4-byte little-endian float32;
``doc_embedding`` is the vector layout of ``serving.vectors``; anything else is UTF-8 JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

SCHEMA_VERSION = 1
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ARM_PATTERN = KIND_PATTERN  # an experiment arm is named like a kind (the strategy it selects by: ``lstm``)
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NAMESPACE_PATTERN = VERSION_PATTERN
# Kinds whose keys would be the shared keys: kind ``stats``'s pointer ``stats:current`` is kind ``current``'s stats.
RESERVED_KINDS = frozenset({"qlog", "stats", "events"})
# Versions whose buckets ``{kind}:{version}:{n}`` would be a kind's own keys (``live:0`` is key 0's live value).
RESERVED_VERSIONS = frozenset(
    {"live", "current", "previous", "experiment", "sketch", "seen", "delta", "lock", "fifo", "invalidated", "epoch"}
)
# admission ``probation``'s state (``admission_fifo``), and the published version's key count it sizes itself by
FIFO_PARTS = ("small", "hits", "main", "ghost", "seq", "published", "tier", "order")
MAX_KEY_LENGTH = 256  # characters of a prediction key (the query log quarantines longer ones)
MAX_SALT = 256  # characters of an experiment's salt
# Control characters, hash-tag braces and lone surrogates (not encodable as UTF-8), as character-class ranges:
# ``check_key`` refuses them all at once, ``ml.features.feature_problems`` screens ad ids for each with its own reason.
KEY_CONTROL_CHARACTERS = r"\x00-\x1f\x7f"
KEY_BRACES = "{}"
KEY_LONE_SURROGATES = r"\ud800-\udfff"
BAD_KEY_CHARACTERS = re.compile(f"[{KEY_CONTROL_CHARACTERS}{KEY_BRACES}{KEY_LONE_SURROGATES}]")


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
PROBABILITY_KINDS = frozenset({"ctr", "campaign"})  # click-through rates: a value outside [0, 1] is no prediction
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
        """Parse ``version:buckets``; ``ValueError`` when it is malformed."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        version, _, buckets = text.rpartition(":")
        if not (buckets.isascii() and buckets.isdigit()) or not 1 <= int(buckets) <= MAX_BUCKETS:
            raise ValueError(f"malformed pointer {text[:80]!r}: expected version:buckets (1 to {MAX_BUCKETS})")
        return cls(check_version(version), int(buckets))

    @classmethod
    def decode_or_none(cls, raw: bytes | None) -> Pointer | None:
        """``decode`` of a pointer read from Redis: None when there is none, or it is malformed (no version)."""
        try:
            return None if raw is None else cls.decode(raw)
        except (ValueError, UnicodeDecodeError):
            return None


# Buckets of one version at most (a billion keys at 64 a bucket): a pointer naming more is malformed, not a version
# whose buckets ``cache stats`` and ``cache invalidate --prefix`` would walk for hours (v1:4000000000 did)
MAX_BUCKETS = 1 << 24


@dataclass(frozen=True)
class KeySchema:
    """Builds every Redis key the project uses; ``namespace`` separates deployments sharing a server."""

    namespace: str = "pc"

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError(f"invalid namespace {self.namespace!r}: expected [A-Za-z0-9_.-]{{1,64}}")

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{SCHEMA_VERSION}"

    def pointer(self, kind: str) -> str:
        return f"{self.prefix}:{check_kind(kind)}:current"

    def bucket(self, kind: str, version: str, bucket: int | str) -> str:
        return f"{self.prefix}:{check_kind(kind)}:{version}:{bucket}"

    def bucket_for_key(self, kind: str, pointer: Pointer, key: str) -> str:
        return self.bucket(kind, pointer.version, bucket_of(key, pointer.buckets))

    def previous(self, kind: str) -> str:
        """The pointer of the version the last flip replaced, for as long as its buckets live (its grace)."""
        return f"{self.prefix}:{check_kind(kind)}:previous"

    def experiment(self, kind: str) -> str:
        """The A/B experiment served with the current version of ``kind`` (JSON, see ``Experiment``)."""
        return f"{self.prefix}:{check_kind(kind)}:experiment"

    def live(self, kind: str, key: str) -> str:
        """A value computed live (``key`` checked by ``check_key``: it stays under ``{kind}:live:``)."""
        return f"{self.prefix}:{check_kind(kind)}:live:{check_key(key)}"

    def invalidated(self, kind: str, version: str) -> str:
        """What invalidations took out of ``version`` of ``kind`` (a set: ``k:{key}``, ``p:{prefix}``, and
        ``b:{index}`` for a bucket they emptied), so that mending or restoring the version never writes it back."""
        return f"{self.prefix}:{check_kind(kind)}:invalidated:{version}"

    def epoch(self, kind: str) -> str:
        """The invalidation counter of ``kind``: incremented before every invalidation of its keys' values, read by
        ``get_or_compute`` before it computes and compared when it stores (``cache._STORE``)."""
        return f"{self.prefix}:{check_kind(kind)}:epoch"

    def events(self) -> str:
        """The user-event stream (``serving.events``)."""
        return f"{self.prefix}:events"

    def user_state(self, user: str) -> str:
        """A user's session state as the user-event sensor carries it (any user id: its digest names the key)."""
        digest = hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return f"{self.prefix}:events:user:{digest}"

    def user_states_span(self) -> str:
        """``{since} {through}`` (stream IDs): ``user_event_sensor`` stored the state of every event's user from
        after ``since`` through ``through`` without a gap (``serving.events.UserStatesSpan``)."""
        return f"{self.prefix}:events:user_states_span"

    def events_trimmed(self) -> str:
        """Event-stream IDs (ms) below this were trimmed by the cleanup job (as ``query_log_trimmed``)."""
        return f"{self.prefix}:events:trimmed_before"

    def query_log(self) -> str:
        return f"{self.prefix}:qlog"

    def query_log_trimmed(self) -> str:
        """Stream IDs (ms) below this were trimmed by the cleanup job: those hours cannot be re-read."""
        return f"{self.prefix}:qlog:trimmed_before"

    def stats(self, kind: str) -> str:
        # Not checked: the query logger's flushing thread builds these and must never raise; whatever the kind,
        # the name stays under ``stats:``, where nothing but these counters lives (kind ``stats`` is refused).
        return f"{self.prefix}:stats:{kind}"

    def admission_seen(self, kind: str, key: str) -> str:
        """Marker of a recent live-tier lookup of ``key`` (admission ``second_miss``), with the window as TTL."""
        return f"{self.prefix}:{check_kind(kind)}:seen:{check_key(key)}"

    def admission_sketch(self, kind: str, shape: tuple[int, int] | None = None) -> str:
        """The count-min sketch of live-tier lookups of ``kind`` (admission ``frequency``); one of another ``shape``
        (width, depth) than the default has a name of its own (``:sketch:{width}x{depth}``): clients of two shapes
        on one kind would take each other's counters and aging cursor for their own."""
        name = f"{self.prefix}:{check_kind(kind)}:sketch"
        return name if shape is None else f"{name}:{int(shape[0])}x{int(shape[1])}"

    def admission_fifo(self, kind: str, part: str) -> str:
        """Part ``small``, ``hits``, ``main``, ``ghost``, ``seq``, ``published``, ``tier`` or ``order`` of admission
        ``probation``'s state of ``kind`` (``FIFO_PARTS``); the hash tag puts them in one Redis Cluster slot, as its
        scripts need."""
        if part not in FIFO_PARTS:
            raise ValueError(f"unknown probation part {part!r}: expected one of {', '.join(FIFO_PARTS)}")
        return f"{self.prefix}:{check_kind(kind)}:fifo:{{{self.prefix}:{kind}}}:{part}"


@functools.lru_cache(maxsize=1024)
def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a valid kind name, else raise ``ValueError`` (cached: a lookup checks it once)."""
    if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
        raise ValueError(f"invalid kind {kind!r}: expected lower-case letters, digits and '_' (max 64)")
    if kind in RESERVED_KINDS:
        raise ValueError(f"invalid kind {kind!r}: its keys would collide with the shared {kind!r} keys")
    return kind


def check_version(version: str) -> str:
    """Return ``version`` if it is a valid version id (no ':' so pointers stay parseable, no braces, none of a
    kind's own key names), else raise ``ValueError``."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"invalid version {version!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    if version.lower() in RESERVED_VERSIONS:
        raise ValueError(
            f"invalid version {version!r}: its buckets would collide with the kind's own keys "
            f"({', '.join(sorted(RESERVED_VERSIONS))} are reserved)"
        )
    return version


def check_key(key: str) -> str:
    """Return the prediction key ``key`` if it can be stored and looked up, else raise ``ValueError``: 1 to
    ``MAX_KEY_LENGTH`` characters, without control characters, lone surrogates or ``{``/``}`` (which would choose
    the Redis Cluster slot of its live key)."""
    if not isinstance(key, str):
        raise ValueError(f"invalid prediction key {key!r}: expected a string")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"invalid prediction key {key[:64]!r}: expected 1 to {MAX_KEY_LENGTH} characters, got {len(key)}"
        )
    bad = BAD_KEY_CHARACTERS.search(key)
    if bad is not None:
        raise ValueError(
            f"invalid prediction key {key[:64]!r}: character {bad.group()!r} at {bad.start()} "
            "(control characters, braces and lone surrogates are refused)"
        )
    return key


def key_list(keys: Iterable[str]) -> Sequence[str]:
    """``keys`` as a sequence a batch lookup can index and measure: a list or tuple as it is; any other iterable
    (a numpy array, a pandas Series or Index, a set, a generator) as a list of its items in iteration order. A numpy
    array failed with "the truth value of an array is ambiguous", a generator with "has no len()", and a set's
    queries went unlogged. One str or bytes is refused by ``check_keys``."""
    return keys if isinstance(keys, list | tuple | str | bytes) else list(keys)


def check_keys(keys: Sequence[str]) -> None:
    """``check_key`` for many keys at C speed (one scan of all of them); raises for the first bad one."""
    if isinstance(keys, str | bytes):  # one key where a sequence was meant: each character would be looked up
        raise ValueError(f"keys must be a sequence of keys, not one {type(keys).__name__}: {keys[:40]!r}")
    if not keys:
        return
    try:
        lengths = list(map(len, keys))
        clean = BAD_KEY_CHARACTERS.search("".join(keys)) is None
    except TypeError:
        clean, lengths = False, [0]
    if not clean or min(lengths) == 0 or max(lengths) > MAX_KEY_LENGTH:
        for key in keys:
            check_key(key)


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


def clean_salt(salt: str) -> str:
    """``salt`` as an experiment's key split uses it, stripped; ``ValueError`` when it is empty, longer than
    ``MAX_SALT`` characters or holds a control character (one the deployment and ``replay --ab`` both refuse, so a
    replay's split is the one production serves)."""
    text = salt.strip() if isinstance(salt, str) else ""
    if not text or len(text) > MAX_SALT or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{salt!r} is not a salt: use a short printable string such as 'ab1'")
    return text


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
            or not all(isinstance(a, str) and ARM_PATTERN.fullmatch(a) for a in arms)
            or len(set(arms)) != 2  # after the names are checked: set() of unhashable arms raised TypeError
        ):
            raise ValueError(f"an experiment needs two distinct arm names like 'frequency', got {list(arms)!r}")
        if not isinstance(self.salt, str) or not self.salt or len(self.salt) > MAX_SALT:
            raise ValueError(f"an experiment needs a non-empty salt (at most {MAX_SALT} characters), got {self.salt!r}")
        if not isinstance(self.name, str) or len(self.name) > 256:
            raise ValueError(f"an experiment name is a string of at most 256 characters, got {self.name!r}")

    def arm(self, key: str) -> str:
        """The arm of ``key``."""
        return arm_of(self.salt, key, self.arms)

    def encode(self, version: str | None = None) -> bytes:
        """JSON of the experiment; with ``version``, the version it is published with (``served_version``)."""
        data = {"name": self.name, "salt": self.salt, "arms": list(self.arms)}
        return json.dumps(data | ({"version": version} if version is not None else {}), separators=(",", ":")).encode()

    @staticmethod
    def served_version(raw: bytes | str) -> str | None:
        """The version a stored experiment was published with (``encode(version=...)``); None for one stored without,
        or malformed. A reader whose pointer names another version read the two around a flip: no experiment."""
        try:
            version = json.loads(raw).get("version")
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
            return None
        return version if isinstance(version, str) else None

    @classmethod
    def decode(cls, raw: bytes | str) -> Experiment:
        """Parse ``encode``'s JSON; ``ValueError`` when it is malformed."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: nested too deep
            raise ValueError(f"experiment is not JSON: {error}") from None
        if not isinstance(data, dict) or not isinstance(data.get("arms"), list):
            raise ValueError("experiment must be a JSON object with name, salt and arms")
        return cls(data.get("name", ""), data.get("salt"), tuple(data["arms"]))
