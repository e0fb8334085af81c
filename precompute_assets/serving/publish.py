"""Publishing a version of precomputed values: write every bucket, then flip one pointer.

Readers see the previous version until the single ``SET`` of the pointer, and the new one after it; a
publish that fails half-way leaves the pointer untouched, and its partial buckets expire by their TTL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from .keys import KeySchema, Pointer, bucket_of, check_kind, check_version, codec_for

KEYS_PER_BUCKET = 64  # small hashes stay in Redis' compact listpack encoding
COMMANDS_PER_PIPELINE = 1000


@dataclass(frozen=True)
class PublishResult:
    kind: str
    version: str
    keys: int
    buckets: int
    bytes: int
    seconds: float
    previous_version: str | None

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else float("inf")


def bucket_count(n_keys: int, keys_per_bucket: int = KEYS_PER_BUCKET) -> int:
    """How many hash buckets a version of ``n_keys`` keys gets."""
    return max(1, math.ceil(n_keys / keys_per_bucket))


def publish_version(
    client: redis.Redis,
    kind: str,
    version: str,
    items: Iterable[tuple[str, Any]],
    *,
    n_keys: int,
    ttl_s: int = 2 * 86400,
    grace_s: int = 600,
    schema: KeySchema | None = None,
    progress: Callable[[int], None] | None = None,
) -> PublishResult:
    """Write ``items`` (``n_keys`` of them) as ``version`` of ``kind`` and make it the current version.

    Buckets are written with their TTL in the same pipeline; the previous version is given ``grace_s``
    to live so that readers holding its pointer finish their reads, then expires as a whole.
    """
    schema = schema or KeySchema()
    check_kind(kind)
    check_version(version)
    codec = codec_for(kind)
    buckets = bucket_count(n_keys)
    started = time.perf_counter()
    grouped: list[dict[str, bytes]] = [{} for _ in range(buckets)]
    written = n_bytes = 0
    for key, value in items:
        encoded = codec.encode(value)
        grouped[bucket_of(key, buckets)][key] = encoded
        n_bytes += len(key) + len(encoded)
        written += 1
    if written != n_keys:
        raise ValueError(f"publish of {kind} {version}: expected {n_keys} keys, got {written}")

    pipe = client.pipeline(transaction=False)
    pending = 0
    for index, mapping in enumerate(grouped):
        if not mapping:
            continue
        name = schema.bucket(kind, version, index)
        pipe.delete(name)  # a retried publish of the same version starts clean
        pipe.hset(name, mapping=mapping)
        pipe.expire(name, ttl_s)
        pending += len(mapping)
        if len(pipe) >= COMMANDS_PER_PIPELINE:
            pipe.execute()
            if progress:
                progress(pending)
            pending = 0
    pipe.execute()
    if progress and pending:
        progress(pending)

    previous = flip_pointer(client, schema, kind, Pointer(version, buckets), grace_s=grace_s)
    return PublishResult(
        kind=kind,
        version=version,
        keys=written,
        buckets=buckets,
        bytes=n_bytes,
        seconds=time.perf_counter() - started,
        previous_version=previous.version if previous else None,
    )


def flip_pointer(
    client: redis.Redis, schema: KeySchema, kind: str, pointer: Pointer, *, grace_s: int
) -> Pointer | None:
    """Atomically make ``pointer`` current; shorten the life of the version it replaces to ``grace_s``."""
    raw = client.set(schema.pointer(kind), pointer.encode(), get=True)
    previous = None if raw is None else Pointer.decode(raw)
    if previous is not None and previous.version != pointer.version:
        pipe = client.pipeline(transaction=False)
        for index in range(previous.buckets):
            pipe.expire(schema.bucket(kind, previous.version, index), grace_s)
            if len(pipe) >= COMMANDS_PER_PIPELINE:
                pipe.execute()
        pipe.execute()
    return previous
